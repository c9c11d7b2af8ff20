"""Entry point: ``python -m trainer.train [overrides]`` (or ``trainer-train``, or under torchrun).

Compose the Hydra config, validate it into typed dataclasses once, share rank 0's resolved
copy with every rank through the run directory, then hand each builder its section.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from trainer.cli import Exit, fail, one_line_errors
from trainer.config import ConfigError, TrainConfig, register_configs

NEW_CONFIG = ".config.yaml.new"  # this start's resolved config, until the run is built


def config_dir() -> str:
    """configs/ of a checkout (editable install) or trainer/configs inside an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs", here / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no configs/train.yaml next to {here}: reinstall the trainer package")


def to_typed(cfg: DictConfig) -> TrainConfig:
    """DictConfig -> TrainConfig; every ``__post_init__`` check runs here, before anything is built."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # drop Hydra's own node
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), cfg))
    assert isinstance(typed, TrainConfig)
    return typed


def load_config(overrides: list[str]) -> TrainConfig:
    """The typed training config for these overrides, composed outside Hydra's app (benchmarks,
    workers): the same configs/ and the same checks as ``python -m trainer.train``."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return to_typed(compose(config_name="train", overrides=overrides))


def prepare_run_dir(run_dir: Path) -> None:
    """Every rank checks the run dir up front, so a bad path fails on all ranks, never hangs one."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        msg = f"run_dir={run_dir} is not writable ({e.strerror}): set run_dir to a writable path"
        raise ConfigError(msg) from None


def absolute_data_paths(cfg: DictConfig) -> None:
    """Dataset directories as absolute paths in the run's config: eval, generate and export find
    the tokenizer beside the data through config.yaml, from whatever directory they run in."""
    data = cfg.data
    if data.path is not None:
        data.path = os.path.abspath(data.path)
    for source in data.sources:
        source.path = os.path.abspath(source.path)


def check_sweep_member(cfg: DictConfig, run_dir: Path) -> None:
    """A sweep member may only continue the run in its directory that has its own overrides.

    Members live in runs/sweeps/<name>/<job number>: a second sweep under the same name would
    otherwise resume the first one's runs, and `trainer.sweep` would report their results under
    the new overrides.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    old_path = run_dir / "config.yaml"
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN or not old_path.is_file():
        return
    old = OmegaConf.load(old_path)
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("hydra") or "/" in key:  # Hydra's own settings, config groups of Hydra
            continue
        was, now = _plain(OmegaConf.select(old, key)), _plain(OmegaConf.select(cfg, key))
        if was != now:
            raise ConfigError(
                f"{run_dir} holds a run of another sweep ({key}={was}; this member has {key}={now}): "
                "give this sweep a new name=..., or delete that directory"
            )


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def share_config(cfg: DictConfig, run_dir: Path, is_main: bool) -> dict[str, Any]:
    """Rank 0 writes the resolved config once; every rank then reads that same file.

    It is written beside config.yaml and replaces it only once the run is built (`publish_config`):
    eval and export read config.yaml to rebuild the run's checkpoints, so a start that is refused
    (another model, an older checkpoint) must leave it as it was.
    """
    from trainer.distributed import barrier

    path = run_dir / NEW_CONFIG
    if is_main:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        os.replace(tmp, path)
    barrier()
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


def publish_config(run_dir: Path, is_main: bool) -> None:
    if is_main:
        os.replace(run_dir / NEW_CONFIG, run_dir / "config.yaml")


def run(cfg: DictConfig) -> None:
    typed = to_typed(cfg)  # validation errors stop the run here, before any process group
    from trainer.signals import STOP_ENV, Preempted, StopSignal

    stop = StopSignal().install()  # from here on a stop request (preemption) is acted on, not fatal
    if os.environ.get(STOP_ENV):  # asked before this worker started (or torchrun restarted it)
        raise Preempted("a stop was requested before this worker started", int(os.environ[STOP_ENV]))
    import torch

    if typed.engine.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("engine.precision=fp16: DeepSpeed has no fp16 on CPU: use bf16 or fp32 there")
    prepare_run_dir(Path(typed.run_dir))
    from trainer.metrics import setup_logging

    # The rank torchrun (or SweepMember, for submitit) set: logging is set up before DeepSpeed logs.
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank, Path(typed.run_dir) / "logs" / f"rank{rank}.log", typed.log_level == "debug")

    from trainer.distributed import init_distributed
    from trainer.loop import build_run, train

    dist = init_distributed()
    absolute_data_paths(cfg)
    check_sweep_member(cfg, Path(typed.run_dir))
    resolved = share_config(cfg, Path(typed.run_dir), dist.is_main)
    built = build_run(to_typed(OmegaConf.create(resolved)), dist)
    publish_config(Path(typed.run_dir), dist.is_main)
    train(built, resolved, stop)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> Any:
    from trainer.sweep import member_crashed, member_exited, sweep_member_dir

    member = sweep_member_dir()  # None: a single run
    try:
        run_reporting_exits(cfg)
    except SystemExit as e:
        # Hydra's basic launcher catches Exception only: a member's SystemExit would end the sweep.
        if member is None or e.code in (0, None):
            raise
        return member_exited(member, e)  # recorded in the member's dir; re-raised outside this process
    except Exception as e:  # a bug: Hydra reports it; the member's dir says so too
        if member is not None:
            member_crashed(member, e)
        raise
    return None


def run_reporting_exits(cfg: DictConfig) -> None:
    """`run`, with every way it stops turned into a one-line message and its exit code."""
    from trainer.checkpoint import CheckpointError
    from trainer.guard import TrainingHalted
    from trainer.signals import EXIT_REQUEUE, Preempted

    try:
        with one_line_errors():
            run(cfg)
    except (TrainingHalted, CheckpointError) as e:
        fail(str(e), 1)  # the run stopped itself: not bad input
    except Preempted as e:
        from trainer.sweep import exit_code_after_stop

        print(f"preempted: {e}", file=sys.stderr)
        code = exit_code_after_stop(e.signum, EXIT_REQUEUE)  # a sweep member may requeue itself
        raise Exit(code, str(e)) from None


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()

"""Load a trained model for inference: a checkpoint (any ZeRO stage) or an exported directory.

``load_model(path)`` accepts a run directory (its newest complete checkpoint), its
``checkpoints/`` directory, one ``checkpoints/step-<N>`` directory, or a directory written by
``python -m trainer.export``, and returns the GPT (eval mode), its tokenizer and its config.
The model config comes from the run's resolved ``config.yaml`` (model section) plus the
dataset's tokenizer (the vocabulary), as in training.

Security: DeepSpeed's checkpoint files are pickles. Consolidating them (DeepSpeed's
``zero_to_fp32`` for ZeRO 1-3, ``torch.load(weights_only=False)`` of the module state for
ZeRO-0) can run code stored in them: only load checkpoints you trust. Exported directories
hold safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from trainer.checkpoint import COMPLETE, STATE, checkpoint_root, complete_checkpoints, saved_state
from trainer.config import ModelConfig
from trainer.data import DataError
from trainer.data.tokenizer import Tokenizer, load_tokenizer
from trainer.errors import InferenceError
from trainer.model import GPT, padded_vocab_size

EXPORT_CONFIG = "trainer_config.json"  # our model config and tokenizer identity, beside config.json
EXPORT_TOKENIZER = "trainer_tokenizer"  # our own tokenizer files (trainer.data.tokenizer format)
WEIGHTS = "model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Source:
    """What a checkpoint or an exported directory holds, before any model is built."""

    path: Path  # the step directory or the exported directory
    kind: str  # "checkpoint" | "export"
    cfg: ModelConfig  # vocab_size resolved
    state_dict: dict[str, torch.Tensor]  # our parameter names, fp32, on the CPU
    tokenizer: Tokenizer
    step: int | None
    run_config: dict[str, Any] | None  # the run's resolved config.yaml (checkpoints only)


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    cfg: ModelConfig
    source: Source


def load_model(
    path: str | Path,
    *,
    tokenizer: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """The GPT of a checkpoint or exported directory, in eval mode on ``device`` in ``dtype``."""
    src = read_source(path, tokenizer=tokenizer)
    model = GPT(src.cfg)
    try:
        model.load_state_dict(src.state_dict, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:2]
        raise InferenceError(
            f"the weights in {src.path} do not fit its model config ({' '.join(first)}): "
            "the checkpoint and its config.yaml disagree"
        ) from None
    src.state_dict = {}  # the model holds the weights now
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(model, src.tokenizer, src.cfg, src)


def read_source(path: str | Path, *, tokenizer: str | Path | None = None) -> Source:
    """Config, consolidated fp32 weights and tokenizer of a checkpoint or an exported directory."""
    path = Path(path)
    if not path.exists():
        raise InferenceError(
            f"checkpoint={path} does not exist: give a run directory, a checkpoints/step-<N> "
            "directory or an exported directory"
        )
    path = path.resolve()  # "step-10" or "." finds its run dir two levels up as well
    if (path / EXPORT_CONFIG).is_file():
        return _read_export(path, tokenizer)
    return _read_checkpoint(find_step_dir(path), tokenizer)


# ---------------------------------------------------------------------------- checkpoints


def find_step_dir(path: Path) -> Path:
    """The step directory meant by a run directory, a checkpoints/ directory or a step directory."""
    root = checkpoint_root(path) if (path / "config.yaml").is_file() else path
    if root.name == "checkpoints" or (root / "latest").is_file():
        if not root.is_dir():
            raise InferenceError(f"checkpoint={path}: the run has no checkpoints/ directory yet")
        complete = complete_checkpoints(root)
        if not complete:
            raise InferenceError(
                f"checkpoint={path}: no complete checkpoint under {root} (a save that did not finish "
                f"leaves no {COMPLETE} file): point checkpoint at a complete step-<N> directory"
            )
        return complete[-1]
    if not (path / COMPLETE).is_file():
        what = "not a checkpoint" if not (path / STATE).is_file() else "an incomplete checkpoint"
        raise InferenceError(
            f"checkpoint={path} is {what} (no {COMPLETE} file; its save did not finish or it is not a "
            "step directory): give a run directory, a complete checkpoints/step-<N> or an exported directory"
        )
    return path


def consolidated_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full model's fp32 weights from a checkpoint of any ZeRO stage, on the CPU.

    ZeRO 1-3 (optimizer shards ``*optim_states.pt``): DeepSpeed's own ``zero_to_fp32``, which
    rebuilds the fp32 master weights from every rank's partition (ZeRO-3 partitions the
    parameters too). ZeRO-0: the module state in ``mp_rank_00_model_states.pt`` (key
    ``module``); under bf16/fp16 those are the 16-bit weights. Both unpickle DeepSpeed's files
    (``weights_only=False``): only load checkpoints you trust.
    """
    try:
        if any(step_dir.glob("*optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            chatter = io.StringIO()  # its progress prints and bars; stdout belongs to the user
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                sd = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
        else:
            states = step_dir / "mp_rank_00_model_states.pt"
            if not states.is_file():
                raise FileNotFoundError(f"no {states.name} and no ZeRO shards")
            sd = torch.load(states, map_location="cpu", weights_only=False)["module"]
    except Exception as e:  # a truncated or foreign file fails in many ways (pickle, zip, asserts)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InferenceError(
            f"checkpoint={step_dir}: cannot read DeepSpeed's weights ({reason}): "
            "the checkpoint is incomplete or damaged; use another step"
        ) from None
    return {k: v.detach().float().cpu() for k, v in sd.items()}


def _read_checkpoint(step_dir: Path, tokenizer: str | Path | None) -> Source:
    run_dir = step_dir.parent.parent
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise InferenceError(
            f"checkpoint={step_dir}: {config_path} is missing, so the model config is unknown: "
            "keep checkpoints inside their run directory"
        )
    run_config = OmegaConf.to_container(OmegaConf.load(config_path), resolve=True)
    assert isinstance(run_config, dict)
    data = run_config["data"]
    data_dir = Path(data.get("path") or data["sources"][0]["path"])  # mixed sources share one tokenizer
    tok, expected = _tokenizer(tokenizer, data_dir / "tokenizer", data_dir / "manifest.json", config_path)
    cfg = _model_config(run_config["model"], tok, f"{config_path} (model)")
    state_dict = consolidated_state_dict(step_dir)
    _check_vocab(cfg, state_dict, tok, step_dir, expected)
    state = saved_state(step_dir) if (step_dir / STATE).is_file() else {}
    step = state.get("trainer", {}).get("step")
    return Source(step_dir, "checkpoint", cfg, state_dict, tok, step, run_config)


def _model_config(section: dict[str, Any], tok: Tokenizer, where: str) -> ModelConfig:
    from trainer.loop import resolve_vocab

    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))
    except Exception as e:  # omegaconf's validation errors, or ConfigError from __post_init__
        raise InferenceError(f"{where}: not a valid model config ({str(e).splitlines()[0]})") from None
    return resolve_vocab(cfg, tok.vocab_size)


def _tokenizer(
    override: str | Path | None, default: Path, manifest: Path | None, where: Path
) -> tuple[Tokenizer, str | None]:
    """The tokenizer to use, and the identity of the one the model was trained with (if known)."""
    expected = None
    if manifest is not None and manifest.is_file():
        expected = json.loads(manifest.read_text()).get("tokenizer", {}).get("identity")
    path = Path(override) if override is not None else default
    if override is None and not path.is_dir():
        raise InferenceError(
            f"the model's tokenizer {path} (from {where}) is missing: pass tokenizer=<dir> "
            "(a prepared dataset's tokenizer/ directory)"
        )
    try:
        return load_tokenizer(path), expected
    except DataError as e:
        raise InferenceError(f"tokenizer={path}: {e}") from None


def _check_vocab(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], tok: Tokenizer, where: Path, expected: str | None
) -> None:
    rows = sd["tok_emb.weight"].shape[0] if "tok_emb.weight" in sd else None
    if rows is not None and rows != padded_vocab_size(cfg):
        raise InferenceError(
            f"the tokenizer has {tok.vocab_size} ids (embedding rows {padded_vocab_size(cfg)}) but "
            f"{where} has {rows} embedding rows: use the tokenizer the model was trained with"
        )
    if expected is not None and tok.identity() != expected:
        raise InferenceError(
            f"the tokenizer ({tok.kind}, {tok.vocab_size} ids) is not the one {where} was trained "
            f"with ({expected[:24]}...): use the model's own tokenizer"
        )


# ---------------------------------------------------------------------------- exported directories


def _read_export(path: Path, tokenizer: str | Path | None) -> Source:
    from safetensors.torch import load_file

    from trainer.hf_weights import from_hf_state_dict

    try:
        meta = json.loads((path / EXPORT_CONFIG).read_text())
    except ValueError:
        meta = None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise InferenceError(f"{path / EXPORT_CONFIG}: damaged (no model section): export it again")
    tok, _ = _tokenizer(tokenizer, path / EXPORT_TOKENIZER, None, path / EXPORT_CONFIG)
    cfg = _model_config(meta["model"], tok, f"{path / EXPORT_CONFIG} (model)")
    if not (path / WEIGHTS).is_file():
        raise InferenceError(f"checkpoint={path}: {WEIGHTS} is missing: export the checkpoint again")
    try:
        hf = load_file(str(path / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types on a damaged file
        raise InferenceError(f"{path / WEIGHTS}: cannot read it ({e}): export the checkpoint again") from None
    state_dict = from_hf_state_dict(cfg, {k: v.float() for k, v in hf.items()})
    _check_vocab(cfg, state_dict, tok, path, meta.get("tokenizer", {}).get("identity"))
    return Source(path, "export", cfg, state_dict, tok, meta.get("source", {}).get("step"), None)

"""The training loop, in execution order: build, resume, then step / log / eval / save until done."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from trainer import checkpoint, hostmem
from trainer.config import ConfigError, ModelConfig, TrainConfig
from trainer.data.batch import to_device
from trainer.data.build import Data, build_data
from trainer.distributed import DistInfo, barrier, gather_to_main, max_over_ranks
from trainer.engine import (
    GradClip,
    build_engine,
    build_model,
    clips_in_trainer,
    current_lr,
    deepspeed_config,
    grad_norm,
)
from trainer.evaluate import evaluate, token_byte_lengths
from trainer.gc_schedule import ScheduledGC
from trainer.guard import StepControl, TrainingHalted
from trainer.metrics import MetricsSink, open_sink
from trainer.perf import Peak, PerfMeter, build_meter, device_peak, loss_scale, memory_stats, peak_rss_gb
from trainer.planner import Plan, check_at_start, compare_peak, measured_peak
from trainer.profiling import StepProfiler
from trainer.signals import Preempted, StopSignal

log = logging.getLogger("trainer")


@dataclass
class TrainState:
    """What the loop itself must remember across a restart (the engine and loader keep their own)."""

    step: int = 0
    tokens: int = 0
    skipped_steps: int = 0
    wandb_id: str | None = None
    loss_window: list[float] = dataclasses.field(default_factory=list)  # the spike guard's recent losses

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.step, self.tokens, self.wandb_id = d["step"], d["tokens"], d.get("wandb_id")
        self.skipped_steps = d.get("skipped_steps", 0)
        self.loss_window = d.get("loss_window", [])


def resolve_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """The model's vocabulary comes from the tokenizer (the model pads it to model.pad_vocab_to)."""
    if cfg.vocab_size is None:
        return dataclasses.replace(cfg, vocab_size=tokenizer_vocab)
    if cfg.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids: "
            "raise model.vocab_size or set it to null to take it from the data"
        )
    return cfg


@dataclass
class Run:
    """Everything built for one run; `fit` drives it."""

    cfg: TrainConfig
    dist: DistInfo
    engine: Any
    data: Data
    state: TrainState
    total_steps: int
    peak: Peak | None  # the device's peak FLOP/s, for MFU
    plan: Plan | None = None  # what trainer.planner predicted for this run


def build_run(cfg: TrainConfig, dist: DistInfo) -> Run:
    """Data, model, engine, then the newest checkpoint (if resuming): ready to step."""
    # freed build-time copies and activations go back to the OS (threshold by width: see trainer.hostmem)
    hostmem.release_large_frees(hostmem.mmap_threshold(cfg.model.d_model))
    # micro_batch_size=auto becomes a number where the world size is known: what follows reads it.
    cfg = dataclasses.replace(cfg, micro_batch_size=cfg.micro_batch(dist.world_size))
    step_dir = checkpoint.resume_dir(cfg.checkpoint, Path(cfg.run_dir), dist)
    checkpoint.check_start(Path(cfg.run_dir), step_dir, cfg.checkpoint.resume)
    # Then: on CPU the peak is measured, and the loader's threads or W&B's process would steal
    # cores from the measurement (a low peak reads as MFU > 100%).
    peak = device_peak(dist.device, cfg.engine.precision, cfg.perf.peak_tflops)
    torch.manual_seed(cfg.seed)
    record_dir = Path(cfg.run_dir) / "sample_ids" if cfg.data.record_ids else None
    data = build_data(
        cfg.data, cfg.global_batch_size, dist.rank, dist.world_size, dist.local_rank, barrier, record_dir
    )
    model_cfg = resolve_vocab(cfg.model, data.vocab_size)
    plan = check_at_start(cfg, model_cfg, dist.world_size)  # refuses a run that cannot fit
    total_steps = cfg.total_steps()
    ds_cfg = deepspeed_config(
        cfg.engine,
        cfg.optim,
        micro_batch_size=cfg.micro_batch_size,
        grad_accum_steps=cfg.grad_accum_steps(dist.world_size),
        world_size=dist.world_size,
        total_steps=total_steps,
        model=model_cfg,
        device_type=dist.device.type,
    )
    # On another world size, ZeRO's partitioned optimizer state goes through DeepSpeed's
    # universal checkpoint (converted once); unpartitioned ZeRO-0 state loads as it is.
    universal = (
        step_dir is not None
        and cfg.engine.zero_stage > 0
        and checkpoint.saved_world_size(step_dir) != dist.world_size
    )
    if universal:
        ds_cfg["checkpoint"] = {"load_universal": True}
    engine = build_engine(build_model(model_cfg, ds_cfg), ds_cfg, cfg.optim, total_steps)
    hostmem.trim()
    if cfg.model.compile:
        compile_model(engine)
    state = TrainState()
    if step_dir is not None:
        if universal:
            checkpoint.universal_dir(step_dir, dist)
        saved = checkpoint.load(engine, step_dir, dist, universal=universal)
        state.load_state_dict(saved["trainer"])
        if not checkpoint.in_run_dir(step_dir, Path(cfg.run_dir)):
            state.wandb_id = None  # a branch from another run's checkpoint is a W&B run of its own
        try:
            data.train.load_state_dict(saved["loader"])
        except (ValueError, KeyError, TypeError) as e:  # a data setting that fixes the sample order changed
            raise ConfigError(
                f"checkpoint.resume: {step_dir}: {e}: set data.seed, data.shuffle_window and the "
                "data.sources weights as that run had them, or start a new run_dir"
            ) from None
        log.info("resumed from %s at step %d", step_dir, state.step)
    return Run(cfg, dist, engine, data, state, total_steps, peak, plan)


def compile_model(engine) -> None:
    """torch.compile the engine's module in place (DeepSpeed's ``engine.compile``: nn.Module.compile).

    In place, the module's state_dict keys stay as they are (no ``_orig_mod.`` prefix), so
    checkpoints of compiled and eager runs load into each other; DeepSpeed's hooks stay outside
    the compiled graph. Compilation itself happens at the first forward (and backward); the
    first step's time, reported as ``compile_s`` in the perf event, is mostly that.
    """
    engine.compile(backend="inductor")


def train(run: Run, resolved_config: dict[str, Any], stop: StopSignal) -> None:
    """Run (or continue) the built run to its end.

    ``stop``: the entry point installs it before anything slow, so a stop request that comes while
    the run is built (minutes for a large model) is acted on at the first step, not fatal.
    """
    cfg, dist = run.cfg, run.dist
    sink = open_sink(
        cfg.logger,
        Path(cfg.run_dir),
        dist.is_main,
        cfg.name,
        resolved_config,
        run.state.step,
        run.state.wandb_id,
    )
    run.state.wandb_id = sink.wandb_id or run.state.wandb_id  # W&B down this time: keep the run's id
    try:
        if run.state.step >= run.total_steps:
            log.info("run already complete at step %d of %d; nothing to do", run.state.step, run.total_steps)
            stop.ignore_further()
        else:
            fit(run, sink, stop)
    except Preempted:
        sink.preempting()
        raise
    finally:
        sink.close()


def fit(run: Run, sink: MetricsSink, stop: StopSignal) -> None:
    """Step until total_steps: fetch, forward/backward/step, then log / eval / save when due."""
    cfg, state = run.cfg, run.state
    control = StepControl(cfg.guard, run.dist, stop, save_every_s=60 * cfg.checkpoint.every_minutes)
    control.window.extend(state.loss_window)  # the spike guard continues as if never stopped
    batches = iter(run.data.train)
    meter = build_meter(
        run.engine.module.cfg,
        cfg.data.seq_len,
        cfg.tokens_per_step(),
        run.dist.world_size,
        run.dist.device,
        run.peak,
    )
    clip = GradClip(cfg.optim.grad_clip) if clips_in_trainer(cfg.engine) else None
    tok = run.data.tokenizer
    byte_lengths = token_byte_lengths(tok) if cfg.eval_every and tok is not None else None  # for val_bpb

    lr = float("nan")  # the lr the optimizer applies this step; engine.step() then moves the schedule on

    def before_optimizer() -> None:
        nonlocal lr
        meter.optimizer_start()
        lr = current_lr(run.engine)
        if clip is not None:
            clip(run.engine)

    # the worst rank's host memory high-water mark once the run is built (model, engine, resume)
    (build_peak,) = max_over_ranks([peak_rss_gb()], run.dist)
    plan = {"plan": run.plan.summary()} if run.plan is not None else {}
    perf_event = {"event": "perf", "step": state.step, "build_peak_rss_gb": build_peak} | meter.describe()
    perf_event |= plan | {"compile": cfg.model.compile}
    if not cfg.model.compile:
        sink.log(perf_event)
    first_step = time.perf_counter()
    losses: list[float] = []
    run.engine.train()
    root = checkpoint.checkpoint_root(Path(cfg.run_dir))
    saver = checkpoint.Saver(run.dist, root, cfg.checkpoint.keep_last, cfg.checkpoint.async_save, sink.log)
    profiling = StepProfiler(cfg.profile, Path(cfg.run_dir), run.dist.rank, run.dist.device)
    with profiling as profiler, saver, ScheduledGC(cfg.gc_every) as collector:
        while state.step < run.total_steps:
            profiler.before_step(state.step + 1)
            meter.step_start()
            batch = next(batches)
            meter.data_done()
            control.step = state.step + 1
            skipped_before = run.engine.skipped_steps
            train_step(run.engine, batch, cfg.micro_batch_size, run.dist.device, control, before_optimizer)
            meter.step_done()
            if cfg.model.compile and first_step is not None:  # compiled in this first step
                sink.log(perf_event | {"compile_s": time.perf_counter() - first_step})
                first_step = None
            state.step += 1
            state.tokens += cfg.tokens_per_step()
            collector.after_step(state.step)  # the same steps on every rank: no rank waits for another's
            if run.engine.skipped_steps > skipped_before:
                record_skip(run, sink, control, batch)
            else:
                losses.append(control.loss)

            last = state.step == run.total_steps
            if state.step % cfg.log_every == 0 or last:
                log_train(run, sink, losses, meter, lr, clip)
                losses.clear()
            if cfg.eval_every and (state.step % cfg.eval_every == 0 or last):
                log_eval(run, sink, byte_lengths)
            saver.poll()  # publishes the save in flight once every rank's write is durable
            every = cfg.checkpoint.every_steps
            periodic = (every and state.step % every == 0) or control.save_due
            if periodic or control.stop_requested or (last and cfg.checkpoint.save_final):
                meter.add_checkpoint(
                    save_checkpoint(run, sink, control, saver, last or control.stop_requested)
                )
            if control.stop_requested and not last:
                stop.ignore_further()
                msg = f"stopped on request after step {state.step}; a restart resumes from there"
                raise Preempted(msg, stop.received)
    if run.plan is not None:  # every rank's peak memory against the plan
        peaks = gather_to_main(measured_peak(run.dist.device), run.dist)
        if peaks is not None:
            sink.log(compare_peak(run.plan, peaks, state.step))
    # Finished: a stop request now has nothing left to save, and the default action (terminate)
    # would turn a finished run into a failed one while it closes its sinks.
    stop.ignore_further()


def log_eval(run: Run, sink: MetricsSink, byte_lengths: torch.Tensor | None) -> None:
    """Validation with the function `python -m trainer.eval` uses, so the two agree exactly."""
    cfg, state = run.cfg, run.state
    micro, device = cfg.micro_batch_size, run.dist.device
    val = evaluate(run.engine, run.data.val, micro, cfg.eval_batches, device, byte_lengths)
    event = {"event": "eval", "step": state.step, "tokens": state.tokens, "val_loss": val.loss}
    sink.log(event | {"val_bpb": val.bits_per_byte})  # bits per byte: comparable across tokenizers


def record_skip(run: Run, sink: MetricsSink, control: StepControl, batch: dict[str, torch.Tensor]) -> None:
    """DeepSpeed dropped this step (by our request, or on its own for non-finite gradients)."""
    reason = control.drop_reason
    if reason is None:
        if run.cfg.engine.precision == "fp16":
            reason = "fp16 overflow: loss scale lowered"  # dynamic loss scaling at work, not a fault
        elif run.cfg.guard.on_nonfinite == "stop":
            raise TrainingHalted(
                f"non-finite gradients at step {control.step}: stopped without saving; lower optim.lr, "
                "or set guard.on_nonfinite=skip to drop such steps"
            )
        else:
            reason = "non-finite gradients"
    run.state.skipped_steps += 1
    ids = gather_to_main(batch["sample_ids"].tolist(), run.dist)  # which samples to look at
    log.warning("step %d dropped: %s", control.step, reason)
    sample_ids = [i for rank_ids in ids or [] for i in rank_ids]
    sink.log({"event": "skip", "step": control.step, "reason": reason, "sample_ids": sample_ids})


def save_checkpoint(
    run: Run, sink: MetricsSink, control: StepControl, saver: checkpoint.Saver, final: bool
) -> float:
    """Save this step; returns the seconds the step loop was blocked (with async saves: the
    snapshot, plus any wait for the previous save's write; a final save waits for its own)."""
    run.state.loss_window = list(control.window)
    state = {"trainer": run.state.state_dict(), "loader": run.data.train.state_dict()}
    times = saver.save(run.engine, run.state.step, state)
    control.saved()
    event = {"event": "checkpoint", "step": run.state.step, "save_s": times["blocked_s"]}
    if saver.asynchronous:
        event |= {"wait_s": times["wait_s"], "async": True}
    sink.log(event)
    if final:  # the run exits after this save: only once it is complete and published
        t0 = time.perf_counter()
        saver.finish()
        times["blocked_s"] += time.perf_counter() - t0
    return times["blocked_s"]


def log_train(
    run: Run,
    sink: MetricsSink,
    losses: list[float],
    meter: PerfMeter,
    lr: float,
    clip: GradClip | None = None,
) -> None:
    """One train event: the loss averaged over the (applied) steps since the last log, and the lr
    the last of them applied."""
    event = {"event": "train", "step": run.state.step, "total_steps": run.total_steps}
    loss = sum(losses) / len(losses) if losses else float("nan")  # already averaged over ranks
    event |= {"tokens": run.state.tokens, "loss": loss, "lr": lr}
    event |= {"grad_norm": grad_norm(run.engine, clip), "skipped_steps": run.state.skipped_steps}
    event |= meter.report(run.total_steps - run.state.step) | memory_stats(run.dist.device)
    (event["peak_rss_gb"],) = max_over_ranks([peak_rss_gb()], run.dist)  # the worst rank's, so far
    if run.cfg.engine.precision == "fp16":
        event["loss_scale"] = loss_scale(run.engine)
    event |= run.data.train.stats()
    sink.log(event)


def train_step(
    engine,
    batch: dict[str, torch.Tensor],
    micro: int,
    device: torch.device,
    drop: Callable[[torch.Tensor], bool] | None = None,
    before_optimizer: Callable[[], None] | None = None,
) -> torch.Tensor:
    """One optimizer step over this rank's slice of the global batch, in micro-batches.

    DeepSpeed scales each micro-batch loss by 1/accumulation steps and steps the optimizer
    (and LR schedule) only at the accumulation boundary. After the last forward, ``drop``
    sees the step's mean loss and may veto the update; ``before_optimizer`` runs just before the
    last ``engine.step()``, which is where DeepSpeed runs the optimizer. Returns the mean loss, unsynced.
    """
    pieces = list(_micro_batches(batch, micro, device))
    losses = []
    for i, (x, y) in enumerate(pieces):
        loss = engine(x, y)[1]  # logits [B, T, V] dropped now, not held through backward and step
        losses.append(loss.detach())
        if i == len(pieces) - 1 and drop is not None and drop(torch.stack(losses).mean()):
            # DeepSpeed drops a step whose gradients are not finite (its overflow path: grads
            # zeroed, optimizer and LR schedule untouched), so a vetoed step goes that way too.
            loss = loss * float("nan")
        engine.backward(loss)
        if i == len(pieces) - 1 and before_optimizer is not None:
            before_optimizer()
        engine.step()
    return torch.stack(losses).mean()


def _micro_batches(batch: dict[str, torch.Tensor], micro: int, device: torch.device) -> Iterator[tuple]:
    tokens = batch["tokens"]  # [G/W, T + 1] int32: widened to int64 inputs and labels on the device
    for i in range(0, tokens.shape[0], micro):
        yield to_device(tokens[i : i + micro], device)

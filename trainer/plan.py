"""Entry point: ``python -m trainer.plan [overrides] plan.device=h100-sxm plan.gpus_per_node=8 plan.nodes=2``.

Takes the overrides ``trainer.train`` takes and prints, before anything is launched, what the run
needs per rank: memory (with fits / does not fit and the overrides that would make it fit), step
time and throughput, communication, time to the end, and checkpoint size (see trainer/planner.py).
"""

from __future__ import annotations

import dataclasses

import hydra
from omegaconf import DictConfig

from trainer.cli import one_line_errors
from trainer.config import ConfigError, TrainConfig, register_configs
from trainer.devices import GiB, cluster
from trainer.planner import Plan, activation_bytes, apply_overrides, make_plan, resolve_model, rss_now
from trainer.train import config_dir, to_typed


def process_baseline() -> int:
    """RSS of a rank before its model: torch, DeepSpeed and its engine modules imported."""
    import deepspeed  # noqa: F401
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.stage3  # noqa: F401

    return rss_now()


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:8.2f} GiB"


def _hms(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    h, rem = divmod(int(seconds), 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def render(plan: Plan, cfg: TrainConfig) -> str:
    d = plan.device
    e = cfg.engine
    offload = " offload" + "+params" * e.offload_params if e.offload_optimizer else ""
    lines = [
        f"plan: {plan.num_params:,} params | {plan.world} x {d.key} ({plan.nodes} node(s) x "
        f"{plan.gpus_per_node}) | ZeRO-{e.zero_stage}{offload} {e.precision} | micro-batch "
        f"{cfg.micro_batch_size} x {cfg.data.seq_len}, {plan.grad_accum} accumulation step(s), "
        f"global batch {cfg.global_batch_size}",
        f"memory per rank ({d.description}):",
    ]
    for item in plan.items:
        where = "" if d.is_cpu else f"{item.where:6s}  "
        phase = f" [{item.phase} only]" if item.phase != "always" and d.is_cpu else ""
        lines.append(f"  {item.name:26s}{_gib(item.nbytes)}  {where}{item.note}{phase}")
    total, verdict = plan.device_bytes(), "fits" if plan.fits() else "DOES NOT FIT"
    if d.is_cpu:
        used = total * plan.gpus_per_node
        lines.append(
            f"  {'total':26s}{_gib(total)}  x {plan.gpus_per_node} rank(s) = {used / GiB:.2f} GiB of the "
            f"node's {d.memory / GiB:.1f} GiB RAM: {verdict}\n"
            f"  (the larger of the step, {plan.phase_bytes('step') / GiB:.2f} GiB, and the save, "
            f"{plan.phase_bytes('save') / GiB:.2f} GiB; on CPU the device memory is host RAM, shared by "
            "the ranks of a node)"
        )
    else:
        lines.append(
            f"  {'total on device':26s}{_gib(total)}  of {d.memory / GiB:.1f} GiB: {verdict} "
            f"({100 * total / d.memory:.0f}%)"
            + (", tight: allocator fragmentation is not counted" * (total > 0.9 * d.memory))
        )
        lines.append(
            f"  {'host RAM':26s}{_gib(plan.host_bytes())}  per rank (the model as built, or offloaded state "
            "and an async save's snapshot)"
        )
    if plan.suggestions:
        lines.append("  fits with: " + " | ".join(" ".join(s) for s in plan.suggestions))
    elif not plan.fits():
        lines.append(
            "  no single change of ZeRO stage, act_ckpt, micro-batch or offload (nor two or three) fits"
        )
    peak = d.peak_flops.get(e.precision, 0.0)
    lo, hi = d.mfu
    tps, ratio = plan.tokens_per_step, plan.flops_per_token / plan.hw_flops_per_token
    fast, slow = plan.step_s()
    (c_fast, c_slow), comm = plan.compute_s(), plan.comm_s()
    link = "inter-node" if plan.nodes > 1 else "intra-node"
    lines += [
        "time:",
        f"  FLOPs per token          {plan.flops_per_token:.4g} (model), {plan.hw_flops_per_token:.4g} "
        f"executed (act_ckpt={cfg.model.act_ckpt}); {plan.flops_per_token * tps:.4g} per step",
        f"  compute per step         {c_fast:.3g} - {c_slow:.3g} s at {100 * lo:.0f}-{100 * hi:.0f}% of "
        f"{peak / 1e12:.4g} TFLOP/s ({e.precision})" + ("" if peak else ": no peak for this precision"),
        f"  communication per step   {plan.comm_bytes / 1e9:.3g} GB sent per rank: {comm:.3g} s at "
        f"{plan.comm_bw / 1e9:.0f} GB/s ({link})",
        f"  step                     {fast:.3g} - {slow:.3g} s"
        + (" (communication overlapped; not overlapped)" if plan.overlap else " (compute + communication)"),
        f"  tokens/s                 {tps / slow:,.0f} - {tps / fast:,.0f} ({tps / slow / plan.world:,.0f} - "
        f"{tps / fast / plan.world:,.0f} per device, MFU {100 * lo * ratio:.0f}-{100 * hi * ratio:.0f}%)",
        f"  to the end               {_hms(fast * plan.total_steps)} - {_hms(slow * plan.total_steps)} "
        f"({plan.total_steps:,} steps)",
        "checkpoint:",
        f"  size                     {plan.checkpoint_bytes / 1e9:.3g} GB: save {plan.checkpoint_s():.3g} s "
        f"at {d.write_bw / 1e9:.3g} GB/s per node x {plan.nodes}",
    ]
    return "\n".join(lines)


def alternatives(plan: Plan, cfg: TrainConfig, baseline: float | None) -> list[str]:
    """Memory per rank at every ZeRO stage (and offload), and activations under every act_ckpt policy."""
    zero3 = ["engine.zero_stage=3"]
    options = [
        (f"{s}", [f"engine.zero_stage={s}", "engine.offload_optimizer=false", "engine.offload_params=false"])
        for s in range(4)
    ]
    options += [
        ("3+offload", [*zero3, "engine.offload_optimizer=true", "engine.offload_params=false"]),
        ("3+offload+params", [*zero3, "engine.offload_optimizer=true", "engine.offload_params=true"]),
    ]
    totals = []
    for name, overrides in options:
        try:
            other = make_plan(
                apply_overrides(cfg, overrides),
                plan.device,
                plan.gpus_per_node,
                plan.nodes,
                baseline=baseline,
                suggest=False,
            )
        except ConfigError:  # e.g. skipping a step needs ZeRO >= 1
            continue
        totals.append(f"{name}: {other.device_bytes() / GiB:.1f}")
    acts = []
    for policy in ("none", "selective", "every_n", "full"):
        model = dataclasses.replace(resolve_model(cfg), act_ckpt=policy)
        nbytes = activation_bytes(
            model, cfg.micro_batch_size, cfg.data.seq_len, cfg.engine.precision, plan.device.is_cpu
        )
        acts.append(f"{policy}: {nbytes / GiB:.2f}")
    return [
        "  by ZeRO stage, GiB per rank on the device: " + " | ".join(totals),
        "  activations by model.act_ckpt, GiB: " + " | ".join(acts),
    ]


def run(cfg: DictConfig) -> Plan:
    typed = to_typed(cfg)
    device, per_node, nodes = cluster(typed.plan)
    # micro_batch_size=auto becomes a number for this cluster's world size, as in training
    typed = dataclasses.replace(typed, micro_batch_size=typed.micro_batch(per_node * nodes))
    baseline = process_baseline() if device.is_cpu else None
    plan = make_plan(typed, device, per_node, nodes, baseline=baseline)
    text = render(plan, typed).split("\n")
    at = next(i for i, line in enumerate(text) if line == "time:")
    print("\n".join(text[:at] + alternatives(plan, typed, baseline) + text[at:]))
    return plan


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    with one_line_errors():
        run(cfg)


def main() -> None:
    register_configs()
    _hydra_main()


if __name__ == "__main__":
    main()

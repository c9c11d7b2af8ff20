"""The planner: model states against DeepSpeed's own estimators and the ZeRO paper, activations
against the tensors autograd really saves, fit suggestions, and bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from trainer.config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EngineConfig,
    ModelConfig,
    TrainConfig,
    register_configs,
)
from trainer.devices import KNOWN_DEVICES, cpu_device, device_spec
from trainer.model import GPT, num_params
from trainer.plan_shapes import largest_module
from trainer.planner import Item, _shapes, activation_bytes, compare_peak, make_plan, param_tensors
from trainer.train import config_dir

SMALL = dict(n_layer=3, n_head=4, d_model=64, max_seq_len=32, vocab_size=300)


def config(
    stage: int, precision: str = "bf16", offload: bool = False, params: bool = False, **top
) -> TrainConfig:
    # DeepSpeed's estimators ignore ZeRO-3's persistence threshold (small tensors kept whole): set it to 0
    raw = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
    engine = EngineConfig(
        zero_stage=stage, precision=precision, offload_optimizer=offload, offload_params=params, ds_config=raw
    )
    top = {"global_batch_size": 64, "micro_batch_size": 1} | top
    return TrainConfig(model=ModelConfig(**SMALL), data=DataConfig(seq_len=32), engine=engine, **top)


def states(plan) -> float:
    return sum(i.nbytes for i in plan.items if i.kind == "state" and i.where == "device")


def host_states(plan) -> float:
    """Host memory as DeepSpeed's estimators count it: the model as built, or the offloaded states
    (``host_bytes`` adds an async save's snapshot, which they leave out)."""
    build = sum(i.nbytes for i in plan.items if i.kind == "build")
    return max(build, sum(i.nbytes for i in plan.items if i.kind == "state" and i.where == "host"))


@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (8, 2)])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_model_states_match_deepspeed_estimator(gpus, nodes, offload):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs, model_to_params

    n = model_to_params(GPT(ModelConfig(**SMALL)))  # what estimate_zero2_..._all_live counts
    assert n == num_params(ModelConfig(**SMALL))
    plan = make_plan(config(2, offload=offload), KNOWN_DEVICES["h100-sxm"], gpus, nodes)
    cpu, gpu = estimate_zero2_model_states_mem_needs(
        n, gpus, nodes, cpu_offload=offload, additional_buffer_factor=1
    )
    assert states(plan) == pytest.approx(gpu, abs=1)
    if nodes == 1 or not offload:  # offloaded, DeepSpeed scales its host figure by all GPUs, not the node's
        assert host_states(plan) * gpus == pytest.approx(cpu, abs=gpus)


@pytest.mark.parametrize("gpus, nodes", [(1, 1), (8, 1), (8, 4)])
@pytest.mark.parametrize("offload, params", [(False, False), (True, False), (True, True)])
def test_zero3_model_states_match_deepspeed_estimator(gpus, nodes, offload, params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params

    n, built = model_to_params(GPT(ModelConfig(**SMALL)))  # built whole at once: the largest module
    gathered = _shapes(ModelConfig(**SMALL), 0)[0]  # gathered at once: a block (a ZeRO-3 leaf module)
    plan = make_plan(config(3, offload=offload, params=params), KNOWN_DEVICES["a100-80gb"], gpus, nodes)
    # DeepSpeed's formula takes one "largest layer" for both; ours differ: each where it applies
    kw = dict(cpu_offload=offload, cpu_offload_params=params, additional_buffer_factor=1)
    _, gpu, _ = estimate_zero3_model_states_mem_needs(n, gathered, gpus, nodes, **kw)
    cpu, _, _ = estimate_zero3_model_states_mem_needs(n, built, gpus, nodes, **kw)
    assert states(plan) == pytest.approx(gpu, abs=1)
    assert host_states(plan) * gpus == pytest.approx(cpu, abs=gpus)


@pytest.mark.parametrize(
    "stage, per_param",
    [(0, lambda g: 16), (1, lambda g: 4 + 12 / g), (2, lambda g: 2 + 14 / g), (3, lambda g: 16 / g)],
)
def test_zero_paper_bytes_per_parameter(stage, per_param):
    """ZeRO (Rajbhandari et al. 2020), mixed precision with Adam: 16-bit weights and gradients,
    fp32 master weights and two moments. (DeepSpeed also keeps an fp32 copy of the gradient
    partition, which the paper leaves out and the plan shows on its own line.)"""
    g = 8
    plan = make_plan(config(stage), KNOWN_DEVICES["h100-sxm"], g, 1)
    paper = ("weights", "gradients", "gradient partition", "master weights", "Adam moments")
    total = sum(i.nbytes for i in plan.items if i.name in paper)
    assert total / plan.num_params == pytest.approx(per_param(g))


def _saved_bytes(cfg: ModelConfig, micro: int) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one training forward."""
    model = GPT(cfg).train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights, and views of them
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randint(0, cfg.vocab_size, (micro, cfg.max_seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_activations_per_block_match_autograd(mlp):
    """The plan's bytes per block (none) and per checkpointed block (full) against what autograd saves."""
    base = ModelConfig(**(SMALL | {"max_seq_len": 64}), mlp=mlp)
    for policy in ("none", "full"):
        cfgs = [dataclasses.replace(base, n_layer=n, act_ckpt=policy) for n in (2, 4)]
        measured = (_saved_bytes(cfgs[1], 2) - _saved_bytes(cfgs[0], 2)) / 2
        planned = (
            activation_bytes(cfgs[1], 2, 64, "fp32", True) - activation_bytes(cfgs[0], 2, 64, "fp32", True)
        ) / 2
        assert planned == pytest.approx(measured, rel=0.05), policy


def test_a_plan_that_does_not_fit_names_overrides_that_do():
    cfg = dataclasses.replace(
        config(0, global_batch_size=64, micro_batch_size=8),
        model=ModelConfig(
            n_layer=32,
            n_head=32,
            d_model=4096,
            d_ff=11008,
            vocab_size=32000,
            max_seq_len=4096,
            tie_embeddings=False,
        ),
    )
    cfg.data.seq_len = 4096
    device = KNOWN_DEVICES["a100-80gb"]
    plan = make_plan(cfg, device, 8, 1)
    assert not plan.fits() and plan.suggestions
    for overrides in plan.suggestions:
        changed = dataclasses.replace(
            cfg, engine=dataclasses.replace(cfg.engine), model=dataclasses.replace(cfg.model)
        )
        for o in overrides:
            key, value = o.split("=")
            section, _, name = key.rpartition(".")
            target = getattr(changed, section) if section else changed
            setattr(
                target,
                name,
                int(value) if value.isdigit() else value == "true" if value in ("true", "false") else value,
            )
        assert make_plan(changed, device, 8, 1).fits(), overrides


def test_time_and_checkpoint_come_from_the_models_counts():
    cfg = config(3)
    plan = make_plan(cfg, KNOWN_DEVICES["h100-sxm"], 8, 2)
    fast, slow = plan.compute_s()
    per_device = plan.flops_per_token * cfg.tokens_per_step() / 16
    assert fast == pytest.approx(per_device / (989e12 * 0.50)) and slow == pytest.approx(
        per_device / (989e12 * 0.35)
    )
    n = plan.num_params
    assert plan.comm_bytes == pytest.approx(
        3 * plan.grad_accum * 15 / 16 * n * 2
    )  # 3 collectives per micro-batch
    assert plan.comm_bw == 45e9  # two nodes: the inter-node link bounds the ring
    assert plan.checkpoint_bytes == 12 * n  # ZeRO-3 saves the fp32 master partitions, no module weights


def test_unknown_device_names_the_known_ones():
    with pytest.raises(ConfigError, match="plan.device='h200'.*h100-sxm.*a100-80gb.*cpu"):
        device_spec("h200")


def test_a_config_the_trainer_refuses_gives_its_error():
    cfg = config(1, global_batch_size=12, micro_batch_size=1)
    with pytest.raises(
        ConfigError, match="global_batch_size=12 is not divisible by micro_batch_size=1 x world size 8"
    ):
        make_plan(cfg, KNOWN_DEVICES["h100-sxm"], 8, 1)
    cfg = dataclasses.replace(config(1), engine=EngineConfig(zero_stage=1, precision="fp16"))
    with pytest.raises(ConfigError, match="engine.precision=fp16: DeepSpeed has no fp16 on CPU"):
        make_plan(cfg, dataclasses.replace(KNOWN_DEVICES["h100-sxm"], key="cpu"), 1, 1, baseline=0)


SEVEN_B = [
    "model=llama-7b",
    "engine=zero3",
    "engine.precision=bf16",
    "data.seq_len=4096",
    "global_batch_size=64",
    "micro_batch_size=1",
    "max_steps=1000",
    "plan.device=h100-sxm",
    "plan.gpus_per_node=8",
    "plan.nodes=2",
]


def _plan_cli(overrides: list[str], capsys) -> str:
    """What `python -m trainer.plan overrides` prints (composed and run in this process)."""
    from trainer.plan import run

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        run(compose(config_name="train", overrides=overrides))
    return capsys.readouterr().out


def test_plan_for_7b_on_two_nodes_of_8_h100(capsys):
    out = _plan_cli(SEVEN_B, capsys)
    assert "6,738,415,616 params | 16 x h100-sxm (2 node(s) x 8) | ZeRO-3" in out
    assert ": fits (" in out and "tokens/s" in out and "inter-node" in out and "checkpoint:" in out


def test_a_run_that_cannot_fit_names_what_would(capsys):
    out = _plan_cli([*SEVEN_B, "engine=zero0", "engine.precision=bf16", "plan.device=a100-40gb"], capsys)
    assert "DOES NOT FIT" in out and "fits with: engine.zero_stage=" in out


@pytest.mark.parametrize(
    "extra",
    [
        {},
        dict(mlp="gelu", bias=True, norm="layernorm", pos_emb="learned"),
        dict(n_kv_head=2, tie_embeddings=False),
    ],
)
def test_parameter_tensors_from_the_config_match_the_model(extra):
    from deepspeed.runtime.zero.stage3 import model_to_params

    cfg = ModelConfig(**SMALL, **extra)
    model = GPT(cfg)
    assert sorted(n for _, n in param_tensors(cfg)[cfg.tie_embeddings :]) == sorted(
        p.numel() for p in model.parameters()
    )
    # the largest unit ZeRO-3 gathers: a block (a leaf module, see trainer.engine), or a table
    tables = [model_to_params(m)[1] for m in (model.tok_emb, model.lm_head, model.pos_emb) if m is not None]
    assert _shapes(cfg, 0)[0] == max(*tables, sum(p.numel() for p in model.blocks[0].parameters()))
    assert largest_module(cfg) == model_to_params(model)[1]  # DeepSpeed's "largest layer"
    assert _shapes(cfg, 100)[1] == sum(p.numel() for p in model.parameters() if p.numel() < 100)


def test_a_measured_peak_more_than_25_percent_off_the_plan_warns(caplog):
    plan = make_plan(config(2), KNOWN_DEVICES["h100-sxm"], 8, 1)
    planned = plan.device_bytes()
    event = compare_peak(plan, [planned * 1.2, planned * 0.9], step=7)
    assert event["ratio"] == pytest.approx(1.2) and event["step"] == 7 and not caplog.records
    event = compare_peak(plan, [planned * 1.1, planned * 0.7], step=7)
    assert event["ratio"] == pytest.approx(0.7)
    assert "differs from the plan" in caplog.text and "-30%" in caplog.text


def cpu_items(stage: int, offload: bool = False, model: ModelConfig | None = None, **top) -> dict:
    """The items of an fp32 plan for 2 CPU ranks (baseline 0), by name."""
    cfg = dataclasses.replace(config(stage, "fp32", offload), **top)
    cfg = dataclasses.replace(cfg, model=model) if model else cfg
    return {i.name: i for i in make_plan(cfg, cpu_device(), 2, 1, baseline=0).items}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_on_cpu_the_optimizers_gradients_are_gone_by_the_save(stage):
    """DeepSpeed drops ZeRO-1/2's flat gradient partition after the optimizer step and the engine
    releases ZeRO-3's pages, so the save does not count them; offloaded, the host's stay."""
    items = cpu_items(stage)
    assert items["fp32 gradients"].phase == "step"
    if stage == 2:
        assert items["gradients"].phase == "step"
    offloaded = cpu_items(stage, offload=True)
    assert offloaded["fp32 gradients"].phase == "always"


def test_a_snapshot_kept_for_the_next_save_counts_under_every_step():
    """The Saver keeps its host buffers for the next save: with saves before the end the whole
    snapshot is under the later steps; with the final save only, just under the save."""

    def snapshot(max_steps: int, every_steps: int) -> Item:
        checkpoint = CheckpointConfig(every_steps=every_steps)
        return cpu_items(1, max_steps=max_steps, checkpoint=checkpoint)["checkpoint snapshot"]

    assert snapshot(100, 0).phase == "save" and snapshot(50, 50).phase == "save"
    assert snapshot(100, 50).phase == "always" and snapshot(100, 50).nbytes >= snapshot(100, 0).nbytes


def test_logits_below_the_mmap_threshold_stay_in_the_heap():
    """Logits of a small vocabulary come from glibc's heap, which keeps them after the step."""
    assert cpu_items(1)["logits"].phase == "always"  # 1 x 32 x 320 fp32: 40 KiB
    wide = dataclasses.replace(ModelConfig(**SMALL), vocab_size=32768)  # 4 MiB each: mapped, returned
    assert cpu_items(1, model=wide)["logits"].phase == "step"


def test_the_cpu_baseline_has_what_the_optimizer_imports():
    """torch.optim imports torch._dynamo (and sympy, networkx: ~70 MiB) when the engine builds its
    optimizer: the baseline is measured with it imported, so building one imports nothing more."""
    code = (
        "import sys, torch\n"
        "from trainer.planner import rss_now\n"
        "rss_now(); before = set(sys.modules)\n"
        "torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])\n"
        "print(sorted(set(sys.modules) - before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]

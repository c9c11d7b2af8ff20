"""Short training runs shared by the export, eval and generate tests: each trained once per session.

The runs live under pytest's session base temp directory and are reused by any test module
that asks for the same name, so test_export.py and test_eval_generate.py train nothing twice.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import assert_ok, run_module, torchrun

GPT2 = ["model.pos_emb=learned", "model.norm=layernorm", "model.mlp=gelu"]
# name -> (ranks, overrides): both architecture mappings, every ZeRO stage, GQA, bias, untied embeddings
RUNS: dict[str, tuple[int, list[str]]] = {
    "llama-zero0": (1, ["engine=zero0"]),
    "llama-gqa-zero3-2ranks": (2, ["engine=zero3", "model.n_kv_head=1"]),
    "gpt2-bias-zero1": (1, ["engine=zero1", *GPT2, "model.bias=true"]),
    "gpt2-untied-zero3": (1, ["engine=zero3", *GPT2, "model.tie_embeddings=false"]),
}


def trained_run(tmp_path_factory, env: dict[str, str], name: str) -> Path:
    """``debug=fast`` (nano, 10 steps, eval at 5 and 10 on 1 batch, final checkpoint) with RUNS[name]."""
    root = tmp_path_factory.getbasetemp() / "trained-runs"
    run_dir = root / name
    if not (run_dir / "checkpoints" / "latest").is_file():
        root.mkdir(exist_ok=True)
        ranks, overrides = RUNS[name]
        args = ["debug=fast", *overrides, f"run_dir={run_dir}"]
        if ranks == 1:
            proc = run_module("trainer.train", args, root, env)
        else:
            proc = torchrun(ranks, ["-m", "trainer.train", *args], root, env)
        assert_ok(proc)
    return run_dir

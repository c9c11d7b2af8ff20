"""``python -m trainer.prepare`` as a user runs it, then the trainer on what it wrote (and on a mixture)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import assert_ok, read_metrics, run_module


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    (root / "in").mkdir()
    for part in range(2):
        docs = [f"Story {part}.{i}: the fox jumps over the dog {i % 7} times." for i in range(150)]
        (root / "in" / f"part{part}.txt").write_text("\n\n".join(docs))
    with open(root / "in" / "c.jsonl", "w") as f:
        for i in range(150):
            f.write(json.dumps({"body": f"Counting {i}: " + " ".join(map(str, range(i % 20)))}) + "\n")
    return root


def prepare(cwd: Path, env: dict, *args: str):
    return run_module("trainer.prepare", list(args), cwd, env, timeout=300)


@pytest.fixture(scope="module")
def prepared(corpus, base_env) -> Path:
    """BPE trained on every input, in two tokenizer processes, with the progress bar on."""
    args = ["inputs=[in/*.txt,in/c.jsonl]", "out_dir=ds", "tokenizer=bpe", "vocab_size=320", "seq_len=16",
            "text_field=body", "val_fraction=0.1", "num_workers=2"]  # fmt: skip
    proc = prepare(corpus, base_env, *args)
    assert_ok(proc)
    assert "wrote ds: " in proc.stdout and "train on it: python -m trainer.train data=prepared" in proc.stdout
    assert "tokenize+write" in proc.stderr and "450 docs" in proc.stderr  # the bar's counts
    return corpus / "ds"


def test_prepare_writes_a_dataset_with_its_tokenizer(prepared):
    m = json.loads((prepared / "manifest.json").read_text())
    assert m["tokenizer"]["kind"] == "bpe" and m["tokenizer"]["vocab_size"] == 320 and m["seq_len"] == 16
    assert m["stats"]["documents"] == 450 and [Path(s["path"]).name for s in m["sources"]] == [
        "part0.txt",
        "part1.txt",
        "c.jsonl",
    ]
    assert (prepared / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "content, args, message",
    [
        ('{"text": "ok"}\n{"text": broken\n', ["inputs=[bad.jsonl]"], "bad.jsonl:2: not valid JSON"),
        ("\n\n  \n", ["inputs=[bad.txt]"], "bad.txt: no documents found"),
        (None, ["inputs=[missing/*.txt]"], "missing/*.txt: the pattern matches no file"),
        (None, [], "inputs is empty"),
        (None, ["inputs=[x.txt]", "seq_len=-1"], "seq_len=-1 must be > 0"),
    ],
)
def test_bad_input_is_one_line_naming_the_file_and_exit_2(tmp_path, cli_env, content, args, message):
    if content is not None:
        (tmp_path / args[0][len("inputs=[") : -1]).write_text(content)
    proc = prepare(tmp_path, cli_env, *args, "out_dir=ds", "progress=false")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "ds").exists()


def test_glob_matching_a_broken_symlink_is_one_line_and_exit_2(tmp_path, cli_env):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a document that is long enough for a few samples")
    (tmp_path / "in" / "b.txt").symlink_to(tmp_path / "in" / "gone.txt")
    proc = prepare(tmp_path, cli_env, "inputs=[in/*.txt]", "out_dir=ds", "progress=false")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "b.txt: matched by in/*.txt but not a readable file" in proc.stderr
    assert not (tmp_path / "ds").exists()


@pytest.mark.slow  # two trainer runs
def test_trainer_on_a_mixture_of_prepared_datasets(prepared, corpus, tmp_path, cli_env):
    """A second dataset with the first one's tokenizer; 3:1 mixing; the vocab comes from the data."""
    second = ["inputs=[in/c.jsonl]", "out_dir=ds2", f"tokenizer={prepared}/tokenizer", "seq_len=16",
              "text_field=body", "val_fraction=0.2", "progress=false"]  # fmt: skip
    assert_ok(prepare(corpus, cli_env, *second))
    sources = f"data.sources=[{{path: {prepared}, weight: 3}}, {{path: {corpus / 'ds2'}, weight: 1}}]"
    args = ["debug=fast", "max_steps=6", "eval_every=3", "global_batch_size=8", "model.max_seq_len=16",
            "data=mixture", sources, "data.record_ids=true", "run_dir=out"]  # fmt: skip
    assert_ok(run_module("trainer.train", args, tmp_path, cli_env))
    events = read_metrics(tmp_path / "out")
    assert [e["step"] for e in events] == list(range(1, 7)) and events[-1]["data_mix_0"] == 0.75
    lines = [
        json.loads(x) for x in (tmp_path / "out" / "sample_ids" / "rank0.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 6 and [x["consumed_samples"] for x in lines] == [8 * k for k in range(1, 7)]
    assert np.bincount(sum((x["source"] for x in lines), []), minlength=2).tolist() == [36, 12]
    assert len(read_metrics(tmp_path / "out", "eval")) == 2

    proc = run_module(
        "trainer.train", [*args[:-1], "model.vocab_size=100", "run_dir=out2"], tmp_path, cli_env
    )
    assert (
        proc.returncode == 2 and "model.vocab_size=100 is smaller than the tokenizer's 320 ids" in proc.stderr
    )


def test_throughput_benchmark_runs(tmp_path, cli_env):
    args = ["--dir", str(tmp_path / "bench"), "--docs", "300", "--seq-len", "32", "--batch-sizes", "4", "8",
            "--repeats", "1", "--no-train"]  # fmt: skip
    proc = run_module("trainer.benchmarks.data_throughput", args, tmp_path, cli_env)
    assert_ok(proc)
    for where in ("page-cache", "disk"):
        assert f"raw sequential read, {where}" in proc.stdout, proc.stdout
        for g in (4, 8):
            assert f"loader, {where:<10} batch {g} " in proc.stdout, proc.stdout
    assert "x raw" in proc.stdout and "loader / training" in proc.stdout
    again = run_module("trainer.benchmarks.data_throughput", args, tmp_path, cli_env)  # reuses the dataset
    assert_ok(again)

"""python -m trainer.report: PNGs for one run and a sweep, labels from the differing overrides."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from trainer.report import main


def _fake_run(path: Path, lr: float, steps: int = 6) -> None:
    path.mkdir(parents=True)
    cfg = {
        "name": "s",
        "run_dir": str(path),
        "optim": {"lr": lr, "betas": [0.9, 0.95]},
        "logger": {"group": "s"},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    events = [{"event": "perf", "step": 0, "peak_tflops": 0.1, "peak_source": "override"}]
    for s in range(1, steps + 1):
        loss = 5 - lr * s
        events.append(
            {"event": "train", "step": s, "tokens": 512 * s, "loss": loss, "tokens_per_s": 1e3, "mfu": 0.01}
        )
        if s % 3 == 0:
            val = {"val_loss": 5.1 - lr * s, "val_bpb": 7.0 - lr * s}
            events.append({"event": "eval", "step": s, "tokens": 512 * s} | val)
    (path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + '{"torn')


def test_one_run(tmp_path: Path, capsys):
    _fake_run(tmp_path / "run", 0.1)
    assert main([str(tmp_path / "run")]) == 0
    for png in ("loss.png", "throughput.png"):
        assert (tmp_path / "run" / "report" / png).stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "best val" in out and "4.4000" in out  # final train loss 5 - 0.1 * 6
    assert "best bpb" in out and "6.4000" in out  # the last eval's: 7 - 0.1 * 6


def test_sweep_dir_is_expanded_and_runs_labelled_by_their_overrides(tmp_path: Path, capsys):
    for i, lr in enumerate((0.1, 0.2)):
        _fake_run(tmp_path / "sweep" / str(i), lr)
    assert main([str(tmp_path / "sweep"), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 10_000
    out = capsys.readouterr().out
    assert "optim.lr=0.1" in out and "optim.lr=0.2" in out and "run_dir" not in out


def test_not_a_run_dir(tmp_path: Path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_runs_of_the_same_config_get_their_dir_names_and_paths_may_mix(tmp_path: Path, capsys, monkeypatch):
    for name in ("a", "b"):
        _fake_run(tmp_path / name, 0.1)
    monkeypatch.chdir(tmp_path)
    assert main(["a", str(tmp_path / "b")]) == 0  # one relative, one absolute
    out = capsys.readouterr().out
    assert "a: s" in out and "b: s" in out
    assert (tmp_path / "report" / "loss.png").is_file()

"""The sweep summary's ranking (bits per byte when every member that evaluated has it, else validation
loss), and which stop requests start a submitit member again."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from trainer.sweep import SUBMITIT_LOCAL_REQUEUE, exit_code_after_stop, summarize


def _member(sweep: Path, num: int, override: str, val_loss: float, val_bpb: float | None) -> None:
    d = sweep / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- {override}\n")
    events = [
        {"event": "train", "step": 10, "total_steps": 10, "loss": val_loss, "tokens_per_s": 100.0},
        {"event": "eval", "step": 10, "val_loss": val_loss} | ({"val_bpb": val_bpb} if val_bpb else {}),
    ]
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_members_with_other_tokenizers_rank_by_bits_per_byte(tmp_path: Path):
    # a BPE member has the higher loss per token but fewer bits per byte than the byte-level one
    _member(tmp_path, 0, "data=bytes", val_loss=1.0, val_bpb=1.44)
    _member(tmp_path, 1, "data=bpe", val_loss=3.0, val_bpb=1.10)
    rows, _ = summarize(tmp_path)
    assert [r["overrides"] for r in rows] == ["data=bpe", "data=bytes"]
    assert [r["val_bpb"] for r in rows] == ["1.1000", "1.4400"]


def test_without_bits_per_byte_on_every_member_the_loss_ranks(tmp_path: Path):
    _member(tmp_path, 0, "optim.lr=0.1", val_loss=1.0, val_bpb=None)  # an older run: no val_bpb
    _member(tmp_path, 1, "optim.lr=0.2", val_loss=3.0, val_bpb=1.10)
    rows, _ = summarize(tmp_path)
    assert [r["overrides"] for r in rows] == ["optim.lr=0.1", "optim.lr=0.2"]
    assert rows[0]["val_bpb"] == ""


def test_a_member_that_never_evaluated_does_not_switch_the_ranking_to_loss(tmp_path: Path):
    _member(tmp_path, 0, "data=bytes", val_loss=1.0, val_bpb=1.44)
    _member(tmp_path, 1, "data=bpe", val_loss=3.0, val_bpb=1.10)
    crashed = tmp_path / "2"
    (crashed / ".hydra").mkdir(parents=True)
    (crashed / ".hydra" / "overrides.yaml").write_text("- data=chars\n")
    rows, _ = summarize(tmp_path)
    assert [r["overrides"] for r in rows] == ["data=bpe", "data=bytes", "data=chars"]
    assert rows[-1]["status"] == "no metrics"


def test_only_submitits_time_limit_signal_starts_a_member_again(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert exit_code_after_stop(signal.SIGUSR2, 85) == 85  # not a submitit job: the launcher decides
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    assert exit_code_after_stop(signal.SIGUSR2, 85) == SUBMITIT_LOCAL_REQUEUE  # its controller restarts it
    assert exit_code_after_stop(signal.SIGTERM, 85) == 85  # a kill: stopped, resumed by the next sweep
    assert exit_code_after_stop(None, 85) == 85  # another rank was signalled

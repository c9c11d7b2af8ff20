"""Reading what a finished (or stopped) run left in its directory: ``config.yaml``,
``metrics.jsonl`` and, for a sweep member that exited early, ``exit.json``. ``trainer.report`` and
``trainer.sweep`` both read runs through it, so they agree on what a run holds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
# A sweep member that ended without finishing (bad config, halted, preempted) records why here; a
# later start of the member removes it.
EXIT = "exit.json"


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config ({} when it has none yet)."""
    import yaml

    path = run_dir / CONFIG
    config = yaml.safe_load(path.read_text()) if path.is_file() else None
    return config if isinstance(config, dict) else {}


def read_events(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """The run's metrics.jsonl events by kind ("train", "eval", ...) in file order; a line torn by a
    kill is skipped."""
    events: dict[str, list[dict[str, Any]]] = {}
    path = run_dir / METRICS
    if not path.is_file():
        return events
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.setdefault(str(event.get("event")), []).append(event)
    return events


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: config keys as they are written on the command line."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def write_exit(member_dir: Path, code: int, reason: str) -> None:
    """Record why a sweep member ended early (written whole, then renamed into place)."""
    tmp = member_dir / f".{EXIT}.tmp"
    tmp.write_text(json.dumps({"code": code, "reason": reason}) + "\n")
    os.replace(tmp, member_dir / EXIT)


def read_exit(member_dir: Path) -> dict[str, Any] | None:
    """{"code", "reason"} of a member that ended early, or None."""
    try:
        record = json.loads((member_dir / EXIT).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def clear_exit(member_dir: Path) -> None:
    (member_dir / EXIT).unlink(missing_ok=True)

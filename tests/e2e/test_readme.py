"""Every command in README.md's ```bash blocks runs here as written, or is excluded for a reason
stated below, so the README cannot drift from the code.

How a command is run (all in one scratch directory, in README order, so later commands find what
earlier ones made, e.g. ``runs/default`` for eval, generate and export):
- ``python``, ``torchrun``, ``accelerate`` are this interpreter's (the virtualenv a user activated);
  ``.venv/bin/python`` likewise. ``launch/`` and ``slurm/`` are links to the checkout's.
- Training is shrunk: every command that trains (``-m trainer.train``) gets SHRINK appended
  (Hydra: the last value wins), and ``checkpoints/step-200`` (the default run's last step) becomes
  the shrunk run's last step. A trailing ``...`` ("your overrides") is dropped.
- The user files the Data and Generate examples read (``corpus/*.txt``, ``web/``,
  ``code.jsonl.gz``, ``prompts.txt``) are made first, from the built-in corpus.
- In a chain ``a && b``, each part is a command of its own (excluded or run).

A new README command runs by default: it must work here, or get an EXCLUDE rule with its reason.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from trainer.data.corpus import builtin_documents

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
# 2 steps and one short evaluation; the model stays (eval reads data of its max_seq_len later)
SHRINK = ["max_steps=2", "eval_every=2", "eval_batches=1"]
LAST_STEP = "step-2"  # where a shrunk run's final checkpoint is

# (pattern searched in the command, why it does not run here). First match wins.
EXCLUDE = [
    (r"\bapt-get\b|^sudo\b", "installs system packages as root (.ci/run does, for tests/slurm)"),
    (r"-m venv\b|\bpip install\b", "the install: CI's .ci/run does the same on a clean clone"),
    (r"^\.ci/run\b", "CI itself, as root: the test suite this test belongs to"),
    (r"\bsbatch\b|hydra/launcher=slurm", "needs a SLURM cluster: tests/slurm run these on the local one"),
    (r"trainer\.benchmarks\.", "a benchmark: minutes of measurement, not a check"),
    (r"--nnodes [2-9]", "needs several hosts (two-node rendezvous is tested in tests/distributed)"),
    (r"(trainer\.train|torchrun\.sh)\b.*model=(gpt2-|llama-)", "trains a model too large for 2 CPU cores"),
]


@dataclass
class Command:
    line: int  # README line number where it starts
    text: str  # as written (continuations joined, comments dropped)
    argv: list[str]

    @property
    def id(self) -> str:
        return f"L{self.line}-{self.argv[0].rsplit('/', 1)[-1]}"


def readme_commands() -> list[Command]:
    """The commands of every ```bash block: continuation lines joined, comments dropped, and
    ``a && b`` split into its parts."""
    commands, block, start, pending = [], False, 0, ""
    for n, raw in enumerate(README.read_text().splitlines(), 1):
        if raw.strip().startswith("```"):
            block = raw.strip() == "```bash"
            continue
        if not block or (not pending and not raw.strip()):
            continue
        start = start if pending else n
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + raw, comments=True)
        pending = ""
        part: list[str] = []
        for word in [*words, "&&"]:
            if word in ("&&", "||") and part:
                commands.append(Command(start, shlex.join(part), part))
                part = []
            elif word not in ("&&", "||"):
                part.append(word)
    return commands


def excluded(cmd: Command) -> str | None:
    return next((why for pattern, why in EXCLUDE if re.search(pattern, cmd.text)), None)


def as_run(cmd: Command) -> tuple[dict[str, str], list[str]]:
    """The environment variables set before the command, and the command as this test runs it
    (see the module docstring)."""
    argv, env = [w for w in cmd.argv if w != "..."], {}
    while re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):  # VAR=value before the command
        key, value = argv.pop(0).split("=", 1)
        env[key] = value
    argv = [w.replace("checkpoints/step-200", f"checkpoints/{LAST_STEP}") for w in argv]
    tools = {"python": sys.executable, ".venv/bin/python": sys.executable}
    if argv[0] in ("torchrun", "accelerate"):
        argv[0] = str(Path(sys.executable).with_name(argv[0]))
    argv[0] = tools.get(argv[0], argv[0])
    if "trainer.train" in argv:
        argv += SHRINK
    return env, argv


COMMANDS = readme_commands()
RUN = [c for c in COMMANDS if not excluded(c)]


def test_the_readme_has_commands_and_every_exclusion_rule_is_used():
    assert len(COMMANDS) > 15 and len(RUN) > 10
    for pattern, why in EXCLUDE:
        assert any(re.search(pattern, c.text) for c in COMMANDS), f"stale rule {pattern!r} ({why})"
    for c in COMMANDS:
        if excluded(c):
            print(f"README line {c.line}: not run here ({excluded(c)}): {c.text}")
    train = [c.text for c in RUN if "trainer.train" in c.argv]
    assert ".venv/bin/python -m trainer.train" in train  # command 1's run, after its install steps
    assert any(t.startswith("torchrun --nproc_per_node 2 -m trainer.train engine=zero3") for t in train)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A user's directory: the launchers beside it, and the input files the examples name."""
    cwd = tmp_path_factory.mktemp("readme")
    for name in ("launch", "slurm"):
        (cwd / name).symlink_to(REPO / name)
    docs = builtin_documents(4000, seed=1)  # ~650 KB: a validation split of > 1 global batch
    (cwd / "corpus").mkdir()
    (cwd / "web").mkdir()
    for i in range(3):
        (cwd / "corpus" / f"part{i}.txt").write_text("\n\n".join(docs[i:2000:3]))
        (cwd / "web" / f"page{i}.txt").write_text("\n\n".join(docs[2000 + i : 3000 : 3]))
    with gzip.open(cwd / "code.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"content": d}) + "\n" for d in docs[3000:])
    (cwd / "prompts.txt").write_text("Once upon a time\nThe cat\n")
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("cmd", RUN, ids=[c.id for c in RUN])
def test_readme_command(cmd, workdir, base_env):
    env = base_env | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    extra, argv = as_run(cmd)
    env |= extra
    proc = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"README line {cmd.line} failed (exit {proc.returncode}): {shlex.join(argv)}\n"
        f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
    )

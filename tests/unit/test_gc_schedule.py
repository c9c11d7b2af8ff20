"""gc_every: Python's automatic cyclic GC off during training, a generation-1 collection every N steps
(the same steps on every rank, as torchtitan's gc_freq), automatic GC back on afterwards."""

from __future__ import annotations

import gc

import pytest

from trainer.config import ConfigError, TrainConfig
from trainer.gc_schedule import ScheduledGC


def _make_cycles(n: int = 3000) -> None:
    for _ in range(n):  # garbage only the cyclic collector frees: enough to trigger automatic GC
        a: list = []
        a.append(a)


@pytest.fixture
def collections():
    """The generation of every collection that starts, whoever started it (gc's own hook)."""
    seen: list[int] = []

    def hook(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(hook)
    yield seen
    gc.callbacks.remove(hook)


def test_automatic_gc_is_off_and_collections_come_every_n_steps(collections):
    assert gc.isenabled()
    collecting_steps = []
    with ScheduledGC(every=3) as scheduled:
        assert not gc.isenabled()
        collections.clear()  # the one on entry
        for step in range(1, 11):
            _make_cycles()
            before = len(collections)
            scheduled.after_step(step)
            if len(collections) > before:
                collecting_steps.append(step)
        inside = list(collections)
    assert gc.isenabled()
    assert collecting_steps == [3, 6, 9]
    assert inside == [1, 1, 1]  # ours only: none started by the allocator on its own
    assert scheduled.collections == 3 and scheduled.seconds > 0


def test_gc_every_zero_leaves_pythons_automatic_gc_alone(collections):
    with ScheduledGC(every=0) as scheduled:
        assert gc.isenabled()
        collections.clear()
        for step in range(1, 5):
            _make_cycles()
            scheduled.after_step(step)
    assert scheduled.collections == 0 and collections  # automatic ones only
    assert gc.isenabled()


def test_gc_is_on_again_after_an_exception():
    with pytest.raises(RuntimeError), ScheduledGC(every=2):
        raise RuntimeError("the loop failed")
    assert gc.isenabled()


def test_gc_every_must_not_be_negative():
    with pytest.raises(ConfigError, match="gc_every"):
        TrainConfig(gc_every=-1)

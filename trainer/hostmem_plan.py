"""Host-memory terms of the plan on CPU: what glibc's heap keeps, and the asynchronous save's snapshot.

On CPU a rank's memory is its RSS, and two things make it differ from "every tensor live at once":

- glibc serves tensors below its mmap threshold (fixed by ``trainer.hostmem`` for the model's
  width: 4 MiB below d_model 1024, 128 KiB from there) from its
  heap, and the heap keeps what they free: a step's small transients (activations of a small
  micro-batch, ZeRO-3's gathered layers and gradient partitions, freed gradients) stay resident
  after the step, while tensors at or above the threshold are unmapped when freed.
- ``checkpoint.async_save`` copies each rank's share of the checkpoint into host buffers before
  the background write (``trainer.checkpoint.Saver``); the copy is allocated while the step's
  transients (buckets, logits) are gone, but the heap's kept memory is not. Its small tensors
  reuse that kept heap; its large ones are new mappings.

So the peak is the larger of two phases (``trainer.planner.Plan.device_bytes``): the step (state,
buffers, activations, logits) and the save (state, what the heap kept, the snapshot). Measured
with ``python -m trainer.benchmarks.plan_accuracy`` (README, "Planning a run").

Pure functions of tensor sizes: ``trainer.planner`` turns them into plan items.
"""

from __future__ import annotations

# ZeRO-3's full-size tensors per partitioned parameter and step that the heap keeps: one. The
# all-gather's output (the whole weight) and autograd's gradient of it are alive one after the
# other, so the gradient reuses the weight's chunks; on gloo the collectives work in their own
# tensors (trainer.engine._collectives_in_place_on_gloo), without gloo's full-size staging copy.
# Measured (plan_accuracy, 36M model): 2 before the in-place collectives, 1 since.
ZERO3_GATHERED_COPIES = 1


def below_threshold(sizes: list[float], threshold: int) -> float:
    """Bytes of the tensors (given in bytes) that glibc serves from its heap."""
    return sum(s for s in sizes if s < threshold)


def zero3_heap_bytes(numels: list[int], w: int, world: int, threshold: int) -> float:
    """What ZeRO-3's per-step gathering and reduce-scattering leaves in the heap, per rank.

    ``numels``: the partitioned parameters' sizes (the persistent ones stay whole and never move).
    Per step each is gathered whole (``w`` bytes an element) and its gradient reduce-scattered to
    a partition of 1/``world``: the full-size tensors below the threshold stay in the heap
    (``ZERO3_GATHERED_COPIES`` of each), and so does each reduced gradient partition below it.
    They are transient, one block at a time, so they reuse the chunks the activations leave as
    backward frees them: the heap keeps the larger of the two, not their sum (the planner).
    """
    full = below_threshold([w * n for n in numels], threshold)
    parts = below_threshold([w * n / world for n in numels], threshold)
    return ZERO3_GATHERED_COPIES * full + parts


def snapshot_bytes(
    stage: int, numels: list[int], w: int, world: int, mixed: bool, threshold: int
) -> tuple[float, float]:
    """(bytes, of which below the threshold) of the worst rank's host copy of its checkpoint share.

    DeepSpeed's files per rank: rank 0 writes the module's weights (``w`` bytes a parameter, one
    tensor per parameter) for ZeRO 0-2; ZeRO-0's rank 0 also the whole optimizer (torch's
    per-parameter fp32 moments, plus fp32 master weights in mixed precision); ZeRO 1-3 every rank
    its optimizer partition (fp32 master, two moments: three flat tensors of n/``world``).
    ZeRO-3 writes no module weights (its fp32 master partitions are the weights).
    """
    n = sum(numels)
    per_param = [w * k for k in numels] if stage < 3 else []
    if stage == 0:
        per_param += [4 * k for k in numels] * (3 if mixed else 2)
        flat = []
    else:
        flat = [4 * n / world] * 3
    sizes = per_param + flat
    return sum(sizes), below_threshold(sizes, threshold)


def freed_after_step(name: str, where: str, stage: int) -> bool:
    """Whether a model-state item is dead between optimizer steps on CPU, so not under a save.

    DeepSpeed's ZeRO-1/2 step flattens the gradient partition for the optimizer and drops it
    after the update (``stage_1_and_2.step``: ``.grad = None``), with ZeRO-2's reduced partition;
    ZeRO-3's flat fp32 gradient partition has its pages released after each step
    (``trainer.engine._release_zero3_grads_between_steps``). Offloaded, the host buffers stay.
    Measured (plan_accuracy, 36M model): the save's peak 0.06-0.13 GiB under a plan counting them.
    """
    return where == "device" and (name == "fp32 gradients" or (name == "gradients" and stage == 2))


def activations_in_heap(tensor_bytes: float, threshold: int) -> bool:
    """Whether a step's activations (or logits) stay resident after it: their typical tensor (one
    micro-batch's d_model-wide hidden state; the logits' [B, T, V]) comes from the heap."""
    return tensor_bytes < threshold

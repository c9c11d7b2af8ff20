"""Host memory: keep glibc's allocator from sitting on freed tensors.

Tensors on the CPU come from malloc. glibc serves a request of at least M_MMAP_THRESHOLD bytes
with its own mmap and returns it to the OS on free; smaller ones come from the heap, whose freed
pages mostly stay with the process. By default the threshold moves up (to 32 MiB) each time an
mmapped block is freed, so soon a model's 1-32 MiB tensors land in the heap, and what a build or
a step frees stays resident and fragments it. A fixed threshold (setting it also stops the
moving) keeps every tensor above it in its own mapping. Measured on 2-rank ZeRO-3 gpt2-medium
(trainer.benchmarks.memory): the worst rank's peak over 3 steps 7.5 GiB with the threshold
fixed only while building, 5.4 GiB with it fixed for the whole run.

The threshold depends on the model's width (``mmap_threshold``). Mapping a tensor costs a page
fault per 4 KiB page each time it is allocated anew, and activations are allocated in every
forward and freed in every backward; kept in the heap instead, their pages are reused, but after
the backward frees them they stay resident under whatever the rest of the step allocates. What
matters is the fault cost against the compute that produces the tensor: an activation element of a
width-D layer takes ~2 D FLOPs per matmul, a fault's share of it is about fixed, so the faults'
share of a step falls as 1/D. Measured: the nanoGPT recipe (D 128, activations of hundreds of
KiB) runs its forward+backward in 50 ms instead of 27 ms at 128 KiB (16,000 page faults a step
instead of 700), and as fast as glibc's default at 4 MiB. At D 1024 (gpt2-medium, micro-batch
1 x 128 tokens) 128 KiB costs ~6,400 more page faults per layer and step (an 8-layer probe: 314k
against 263k, 1.71 against 1.65 CPU-s), ~0.2 s of a 14-16 s 2-rank ZeRO-3 step here, and it
keeps the 0.2 GiB of activations that the backward frees from staying resident in the heap
under the step's high-water mark (the tied embedding's gradients at the end of the backward):
the worst rank's peak 3.53 GiB instead of 3.82 (trainer.benchmarks.memory, together with the
loop dropping the logits, 25 MB of it). So: glibc's initial 128 KiB from D 1024 on, 4 MiB below,
which still gives the tensors that fragment the heap (weights, gradients, flat partitions,
logits: MiBs each) their own mappings.

Both calls are no-ops off glibc (macOS, musl): there the allocator is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import platform

import torch

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
MMAP_THRESHOLD = 4 * 1024 * 1024  # narrow models' (see above)
WIDE_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value: for models from WIDE_D_MODEL on
WIDE_D_MODEL = 1024


def mmap_threshold(d_model: int | None) -> int:
    """The fixed mmap threshold for a model of this width (see above); None: the narrow one."""
    return WIDE_MMAP_THRESHOLD if d_model is not None and d_model >= WIDE_D_MODEL else MMAP_THRESHOLD


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_large_frees(threshold: int = MMAP_THRESHOLD) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap from now on (freed: unmapped at
    once), whatever was freed before. Returns whether the allocator took the setting."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, threshold))


MADV_DONTNEED = 4  # madvise advice (Linux, all architectures): drop the pages; they read back as zeros
PAGE = mmap.PAGESIZE


def release_pages(t: torch.Tensor) -> int:
    """Give the whole pages inside ``t``'s memory back to the OS; returns the bytes released.

    For a buffer whose contents are dead until it is next written in full: its pages then read
    as zeros and come back (zero-filled, one page fault each) as they are written. Only pages
    that lie entirely inside ``t`` are released, so a neighbouring allocation is never touched.
    A no-op for anything but a contiguous CPU tensor on Linux.
    """
    libc = _glibc()
    if libc is None or t.device.type != "cpu" or not t.is_contiguous():
        return 0
    start = t.data_ptr()
    first, end = -(-start // PAGE) * PAGE, (start + t.numel() * t.element_size()) // PAGE * PAGE
    if end <= first:
        return 0
    if libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), MADV_DONTNEED) != 0:
        return 0
    return end - first


def trim() -> None:
    """Give the heap's free pages back to the OS (after a phase that freed a lot: the build)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)

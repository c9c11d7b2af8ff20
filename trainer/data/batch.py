"""A loader batch on the device: the compact ``tokens`` rows widened to the model's inputs and labels.

The loader ships each sample once, as stored: ``tokens`` [B, seq_len + 1] int32 (the manifest's
uint16 or uint32 ids, widened on the host only as far as torch's well-supported int32). The model
wants int64 inputs ``tokens[:, :-1]`` and labels ``tokens[:, 1:]``; building those here, after the
transfer, moves 2x fewer bytes host -> GPU than two int64 tensors and costs the GPU next to nothing.
"""

from __future__ import annotations

import torch


def to_device(tokens: torch.Tensor, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) on ``device``: int64 [B, T] each, from ``tokens`` [B, T + 1] (any integer dtype).

    On a CPU device the widening and the two copies happen here, in the training step, instead of
    in the loader's prefetch thread: the same work (the same integers reach the model), moved.
    To a GPU the rows go from pinned memory, so the copy is asynchronous (from pageable memory
    ``non_blocking`` would still wait for it); torch caches pinned blocks, so pinning each batch
    reuses the same few buffers.
    """
    if pins_for(tokens, device):
        tokens = tokens.pin_memory()
    t = tokens.to(device, non_blocking=True).long()
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def pins_for(tokens: torch.Tensor, device: torch.device | str) -> bool:
    """Whether ``to_device`` pins ``tokens`` first: host rows bound for a CUDA device, not yet pinned."""
    return torch.device(device).type == "cuda" and tokens.device.type == "cpu" and not tokens.is_pinned()

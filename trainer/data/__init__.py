"""Data: text -> tokenizer -> packed fixed-length samples -> webdataset tar shards -> streaming loader.

Modules: ``corpus`` (the built-in training corpus), ``tokenizer`` (byte / char / bpe), ``readers``
(input files -> documents), ``manifest`` (the dataset format's names and the manifest check, shared by
both sides), ``prepare`` (writes shards and ``manifest.json``), ``shards`` (reads one shard, finds
damage), ``order`` (one epoch's seeded sample order), ``mixture`` (weighted interleaving of several
datasets), ``loader`` (the deterministic, resumable ``ShardLoader``), ``prefetch`` (its background
thread), ``batch`` (a batch's ``tokens`` -> the model's inputs and labels on the device) and
``build`` (the loaders from the config's data section).
The names below are importable from ``trainer.data`` directly; the loader (which needs torch) is
imported on first use so that preparing data does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any


class DataError(Exception):
    """Input data or a prepared dataset that cannot be used; the message names the file and the fix."""


_LAZY = {
    "write_builtin_corpus": "corpus",
    "load_tokenizer": "tokenizer",
    "build_tokenizer": "tokenizer",
    "Tokenizer": "tokenizer",
    "prepare_dataset": "prepare",
    "prepare_builtin": "prepare",
    "load_manifest": "manifest",
    "ShardLoader": "loader",
    "Mixture": "mixture",
    "to_device": "batch",
}

__all__ = ["DataError", *_LAZY]


def __getattr__(name: str) -> Any:  # PEP 562: import submodules only when a name is used
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""A prepared dataset's on-disk format: the names ``prepare`` writes and the loader reads, and the
check of ``manifest.json``. Both sides import it; it imports neither (nor torch).

A dataset directory holds ``manifest.json`` (written last), tar shards of samples stored as
``<key>.tokens.bin`` (``seq_len + 1`` token ids of ``dtype``) per split, and ``tokenizer/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.data import DataError

FORMAT = "trainer.tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FIELD = "tokens.bin"
SPLITS = ("train", "val")
TOKENIZER_DIR = "tokenizer"
DTYPES = {"uint16": "<u2", "uint32": "<u4"}  # manifest dtype -> numpy dtype of the stored ids
_SHARD_KEYS = {"path": str, "samples": int, "sha256": str, "bytes": int}


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"not a {FORMAT} manifest"
    if m.get("version") != FORMAT_VERSION:
        return f"format version {m.get('version')}, this code reads version {FORMAT_VERSION}"
    if not isinstance(m.get("seq_len"), int) or m["seq_len"] <= 0 or m.get("dtype") not in DTYPES:
        return "seq_len or dtype missing or invalid"
    if not isinstance(m.get("tokenizer"), dict) or not isinstance(m["tokenizer"].get("vocab_size"), int):
        return "tokenizer section missing"
    if m["tokenizer"]["vocab_size"] > 1 << 31:  # batches carry the ids as int32
        return f"vocab_size {m['tokenizer']['vocab_size']} exceeds 2^31: batches hold ids as int32"
    for split in SPLITS:
        shards = m.get("splits", {}).get(split, {}).get("shards")
        if not isinstance(shards, list):
            return f"split {split!r} missing"
        for shard in shards:
            if not isinstance(shard, dict) or any(
                not isinstance(shard.get(k), t) for k, t in _SHARD_KEYS.items()
            ):
                return f"a shard entry of split {split!r} lacks path, samples, sha256 or bytes"
    return None


def load_manifest(dataset_dir: str | Path) -> dict[str, Any]:
    """The dataset's ``manifest.json``, checked; DataError names the file and what to do."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise DataError(
            f"{path}: not found (not a prepared dataset, or its preparation did not finish): "
            "prepare the data first, or set data.builtin=true for the built-in corpus"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exn:
        raise DataError(f"{path}: not valid JSON ({exn}): prepare the data again") from exn
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: {problem}: prepare the data again")
    return manifest

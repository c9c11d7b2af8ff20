"""Read one tar shard into its samples' token rows, and say which samples are intact.

A shard is read in one sequential read: a local file straight into a caller's reusable buffer (no
fresh allocation per shard), a URL or a ``pipe:`` command through ``webdataset.gopen``. The shards
``prepare`` writes have one regular layout: each sample is a ustar member (512-byte header, payload
padded to 512 bytes) of the same size, type and name pattern. That layout is checked and sliced with
numpy at memory speed; a shard that does not match it in any way (another writer, or damage) goes
through Python's ``tarfile`` member by member, which finds exactly which samples are intact and
what is wrong.

A damaged shard is described, never silently used: ``read_shard`` names the first problem and
marks the samples that can still be trusted. A read or tar error keeps the samples before
it; a shard with more samples than the manifest says, or (with ``sha256``) other bytes than the
manifest's, has no trusted sample at all.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import numpy as np
import webdataset as wds

from trainer.data.prepare import FIELD

_BLOCK = 512
_SUFFIX = f".{FIELD}".encode()


def _reason(exn: BaseException) -> str:
    # tarfile errors carry webdataset's extra args; strerror is the readable part of an OSError
    return str(getattr(exn, "strerror", None) or (exn.args[0] if exn.args else type(exn).__name__))


def read_shard(
    url: str, out: np.ndarray, sha256: str | None = None, buffer: bytearray | None = None
) -> tuple[np.ndarray, str | None]:
    """Fill ``out`` (uint8 [samples the manifest lists, sample bytes]) with the shard's payloads.

    Returns (valid [samples] bool, the first problem or None). Rows that are not valid are zeros.
    With ``sha256`` the shard's bytes are hashed too (in memory, no second read). A local file is
    read into ``buffer`` (grown as needed; its contents are scratch once this returns), so a caller
    that reads shard after shard reuses one allocation.
    """
    samples = len(out)
    try:
        data = _read_all(url, bytearray() if buffer is None else buffer)
    except Exception as exn:
        out[:] = 0
        return np.zeros(samples, bool), f"cannot read it ({_reason(exn)})"
    payload = _slice_regular(data, samples, out.shape[1])
    if payload is not None:
        out[:] = payload
        valid, problem = np.ones(samples, bool), None
    else:
        valid, problem = _read_members(data, out)
    if problem is None and sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        out[:] = 0
        return np.zeros(samples, bool), "sha256 differs from the manifest"
    return valid, problem


def _read_all(url: str, buffer: bytearray) -> memoryview | bytes:
    """The shard's bytes: a local file read into ``buffer``, anything else through gopen."""
    if "://" in url or url.startswith("pipe:"):
        stream = wds.gopen(url, "rb")
        data = stream.read()
        stream.close()  # a pipe: command's exit status is checked here
        return data
    with open(url, "rb", buffering=0) as f:
        size, end = 0, os.fstat(f.fileno()).st_size + 1  # one spare byte: EOF shows in the same pass
        while True:
            if len(buffer) < end:
                buffer.extend(bytes(end - len(buffer)))
            got = f.readinto(memoryview(buffer)[size:end])
            if not got:
                return memoryview(buffer)[:size]
            size += got
            if size == end:  # the file grew since fstat: read on
                end *= 2


def _slice_regular(data: memoryview | bytes, samples: int, sample_bytes: int) -> np.ndarray | None:
    """The payloads [samples, sample_bytes] if ``data`` is exactly prepare's layout, else None.

    The first header is parsed (and its checksum checked) by tarfile; every other header must agree
    with it on the fields that fix the layout: size, type, and the name up to the key's digits.
    Other header bytes do not change which bytes are payload, so they are not compared.
    """
    stride = _BLOCK + -(-sample_bytes // _BLOCK) * _BLOCK
    end = samples * stride
    if samples == 0 or len(data) < end + 2 * _BLOCK:
        return None
    buf = np.frombuffer(data, np.uint8)
    heads = buf[:end].reshape(samples, stride)[:, :_BLOCK]
    key_len = _key_length(bytes(heads[0]), sample_bytes)
    if key_len is None or buf[end : end + 2 * _BLOCK].any():
        return None  # another layout, or not followed by the end-of-archive blocks
    for lo, hi in ((key_len, 100), (124, 136), (156, 157)):  # name after the key, size, type
        if not (heads[:, lo:hi] == heads[0, lo:hi]).all():
            return None
    return buf[:end].reshape(samples, stride)[:, _BLOCK : _BLOCK + sample_bytes]  # a view: no copy yet


def _key_length(head: bytes, sample_bytes: int) -> int | None:
    """Length of the first member's key if it is a regular ``<key>.tokens.bin`` of the right size."""
    try:
        info = tarfile.TarInfo.frombuf(head, "utf-8", "surrogateescape")  # checks its checksum too
    except tarfile.HeaderError:
        return None
    name = head[:100].split(b"\0", 1)[0]
    if not (info.isreg() and info.size == sample_bytes and head[345] == 0 and name.endswith(_SUFFIX)):
        return None
    return len(name) - len(_SUFFIX)


def _read_members(data: memoryview | bytes, out: np.ndarray) -> tuple[np.ndarray, str | None]:
    """The slow, exact path: walk the tar member by member and record what is intact."""
    samples, sample_bytes = out.shape
    payloads: list[bytes | None] = []  # one per regular member: each member is one sample's position
    problem = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
            for member in tar:
                if member.isreg():
                    ours = member.name.endswith(_SUFFIX.decode())
                    payloads.append(tar.extractfile(member).read() if ours else None)  # type: ignore[union-attr]
    except Exception as exn:  # any damage: keep what came before it
        problem = f"cannot read it ({_reason(exn)})"
    out[:] = 0
    valid = np.zeros(samples, bool)
    if len(payloads) > samples:
        return valid, f"holds more than the {samples} samples the manifest says"
    if problem is None and len(payloads) < samples:
        problem = f"holds {len(payloads)} samples but the manifest says {samples} (truncated or replaced)"
    for i, payload in enumerate(payloads):
        if payload is not None and len(payload) == sample_bytes:
            out[i] = np.frombuffer(payload, np.uint8)
            valid[i] = True
        elif problem is None:
            problem = f"sample {i}'s {FIELD} is missing or not {sample_bytes} bytes"
    return valid, problem

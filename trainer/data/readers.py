"""Input files for ``prepare``: which files, and their documents as a stream of text pieces.

Inputs are files, directories (searched recursively for .txt/.text/.md and .jsonl/.ndjson/.json,
optionally .gz, skipping hidden files) and glob patterns, read in the given order (each expansion
sorted) and streamed line by line: no file is ever held whole in memory. A plain-text file holds
documents separated by blank lines (a line with only whitespace); a JSON Lines file holds one
object per line with the text under ``text_field``.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import io
import json
import zlib
from pathlib import Path
from typing import IO, Iterable, Iterator

from trainer.data import DataError

TEXT_SUFFIXES = {".txt", ".text", ".md"}
JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
_MAX_PIECE_CHARS = 1 << 22  # a longer document is tokenized in pieces, so no file is held whole


def _suffix(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _dir_files(directory: Path) -> list[Path]:
    known = TEXT_SUFFIXES | JSONL_SUFFIXES
    files = [
        p
        for p in sorted(directory.rglob("*"))
        if p.is_file()
        and _suffix(p) in known
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)  # skip hidden
    ]
    if not files:
        raise DataError(
            f"{directory}: no .txt/.md/.jsonl/.json files inside: point to a file or glob instead"
        )
    return files


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files to read, in order: each input is a file, a directory or a glob pattern."""
    files: list[Path] = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        text = str(item)
        if any(c in text for c in "*?[") and not Path(text).exists():
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise DataError(f"{text}: the pattern matches no file: check the path")
            for match in map(Path, matches):
                if not match.is_dir() and not match.is_file():  # a broken symlink, a socket, ...
                    raise DataError(
                        f"{match}: matched by {text} but not a readable file (a broken symlink?): "
                        "remove it or narrow the pattern"
                    )
                files += _dir_files(match) if match.is_dir() else [match]
        elif Path(text).is_dir():
            files += _dir_files(Path(text))
        elif Path(text).is_file():
            files.append(Path(text))
        else:
            raise DataError(f"{text}: no such file or directory: check the input path")
    if not files:
        raise DataError("no input files given: pass at least one file, directory or glob")
    return files


class ReadCounter:
    """Bytes read from the input files so far (compressed bytes for .gz): a progress bar's position.

    ``files`` lists the files opened so far, in order: the last one is the file being read.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.files: list[Path] = []


class _Counted(io.RawIOBase):
    """A raw file that adds every byte it reads to a ReadCounter."""

    def __init__(self, path: Path, counter: ReadCounter):
        self._raw = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        self._counter = counter

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer) or 0
        self._counter.bytes += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextlib.contextmanager
def _reading(path: Path, counter: ReadCounter | None) -> Iterator[IO[str]]:
    """Open ``path`` as UTF-8 text; I/O and decoding errors become a DataError naming the file."""
    counter = counter or ReadCounter()
    counter.files.append(path)
    try:
        with contextlib.ExitStack() as stack:
            raw = stack.enter_context(io.BufferedReader(_Counted(path, counter), 1 << 20))
            if path.suffix.lower() == ".gz":
                raw = stack.enter_context(gzip.GzipFile(fileobj=raw))  # type: ignore[assignment]
            yield stack.enter_context(io.TextIOWrapper(raw, encoding="utf-8"))
    except UnicodeDecodeError as exn:
        found = _first_bad_utf8(path)  # exn.start counts from the decoder's current chunk, not the file
        line, at = (f":{found[0]}", f" at byte {found[1]}") if found else ("", "")
        raise DataError(f"{path}{line}: not UTF-8 text ({exn.reason}{at}): convert it to UTF-8") from exn
    except (OSError, EOFError, zlib.error) as exn:  # zlib.error: a damaged .gz
        raise DataError(f"{path}: cannot read ({exn}): check the file") from exn


def _first_bad_utf8(path: Path) -> tuple[int, int] | None:
    """(line, byte offset) of the first invalid UTF-8 in ``path`` (streamed again), or None.

    The offset counts from 0 in the file (in the uncompressed text for .gz).
    """
    decoder = codecs.getincrementaldecoder("utf-8")()
    read = lines = 0  # bytes read so far, and the newlines in them
    try:
        with gzip.open(path) if path.suffix.lower() == ".gz" else open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                pending = len(decoder.getstate()[0])  # the start of a character split across chunks
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as exn:  # exn.start counts from the pending bytes
                    before = chunk[: max(0, exn.start - pending)]
                    return lines + before.count(b"\n") + 1, read - pending + exn.start
                read, lines = read + len(chunk), lines + chunk.count(b"\n")
            pending = len(decoder.getstate()[0])
            if pending:  # the file ends inside a character
                return lines + 1, read - pending
    except (OSError, EOFError, zlib.error):
        pass
    return None


def _text_pieces(path: Path, counter: ReadCounter | None) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of the blank-line separated documents of a text file."""
    lines: list[str] = []
    size = 0
    with _reading(path, counter) as f:
        for line in f:
            if line.strip():
                lines.append(line)
                size += len(line)
                if size >= _MAX_PIECE_CHARS:  # keep the last line: the document's end strips its newline
                    yield "".join(lines[:-1]), False
                    lines, size = lines[-1:], len(lines[-1])
            elif lines:
                yield "".join(lines).removesuffix("\n"), True
                lines, size = [], 0
    if lines:
        yield "".join(lines).removesuffix("\n"), True


def _jsonl_pieces(path: Path, text_field: str, counter: ReadCounter | None) -> Iterator[tuple[str, bool]]:
    with _reading(path, counter) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as exn:  # RecursionError: nested too deeply
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({exn}): JSON Lines needs one object per line; "
                    "fix or delete the line"
                ) from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: no string field {text_field!r}: "
                    "set text_field to the key that holds the text"
                )
            if "\\u" in line:  # only a \u escape can make a lone surrogate: the line itself is UTF-8
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exn:
                    raise DataError(
                        f"{path}:{lineno}: field {text_field!r} holds a lone surrogate "
                        f"({text[exn.start]!r}, not valid Unicode): fix or delete the line"
                    ) from None
            if text:
                yield text, True


def iter_documents(
    files: list[Path], text_field: str = "text", counter: ReadCounter | None = None
) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of every document in ``files``; long documents come in pieces."""
    for path in files:
        if _suffix(path) in JSONL_SUFFIXES:
            yield from _jsonl_pieces(path, text_field, counter)
        else:
            yield from _text_pieces(path, counter)

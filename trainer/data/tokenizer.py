"""Tokenizers behind one small interface: ``byte``, ``char`` and Hugging Face ``tokenizers`` (bpe / hf).

Every tokenizer has ``encode``, ``decode``, ``vocab_size``, ``eot_id`` (the end-of-text id that
separates documents in the packed stream), ``save(directory)`` and ``identity()`` (a stable hash
of everything that decides the ids, recorded in the dataset manifest). ``load_tokenizer`` reads
back any saved tokenizer; ``build_tokenizer`` makes one from a name or file, training it if needed.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from trainer.data import DataError

EOT_TEXT = "<|endoftext|>"
CONFIG_FILE = "tokenizer_config.json"
HF_FILE = "tokenizer.json"
# End-of-text tokens of common tokenizer.json files, in the order we look for them.
_KNOWN_EOT = (EOT_TEXT, "<|end_of_text|>", "</s>", "<eos>")


class Tokenizer(ABC):
    """text <-> ids; ``kind`` names the implementation in saved configs and manifests."""

    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    @abstractmethod
    def eot_id(self) -> int: ...

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str: ...

    @abstractmethod
    def _spec(self) -> dict[str, Any]:
        """Everything that decides the ids (JSON-serializable); saved and hashed."""

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Ids of each text as an int64 array, without end-of-text (prepare's hot path)."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def identity(self) -> str:
        blob = json.dumps(self._spec(), sort_keys=True, ensure_ascii=True).encode()
        return f"{self.kind}-sha256:{hashlib.sha256(blob).hexdigest()}"

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, **self._spec()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
        return directory


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0-255; 256 is end-of-text. Needs no training and never fails."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eot_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        out, pending = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                out += [pending.decode("utf-8", errors="replace"), EOT_TEXT]
                pending.clear()
            elif 0 <= i < 256:
                pending.append(i)
            else:
                raise ValueError(f"id {i} is outside the byte tokenizer's vocabulary (0-256)")
        return "".join(out) + pending.decode("utf-8", errors="replace")

    def _spec(self) -> dict[str, Any]:
        return {"kind": "byte", "eot_id": 256}


class CharTokenizer(Tokenizer):
    """One id per character seen in the corpus (sorted by code point), then end-of-text."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self._codes = np.array([ord(c) for c in self.chars], dtype=np.int64)  # sorted: searchsorted works

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    @property
    def eot_id(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return self._ids(text).tolist()

    def _ids(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        ids = np.searchsorted(self._codes, codes)
        known = np.append(self._codes, -1)  # sentinel: ids == len(vocab) never match
        bad = known[ids] != codes
        if bad.any():
            char = chr(codes[np.argmax(bad)])
            raise DataError(
                f"character {char!r} is not in the char tokenizer's vocabulary: use tokenizer=byte"
            )
        return ids

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self._ids(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(EOT_TEXT if i == self.eot_id else self.chars[i] for i in ids)

    def _spec(self) -> dict[str, Any]:
        return {"kind": "char", "chars": self.chars}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` tokenizer: ``bpe`` when trained here, ``hf`` from a tokenizer.json."""

    def __init__(self, tokenizer: Any, kind: str = "hf", source: str = "tokenizer"):
        # A tokenizer.json may truncate or pad every encoding: documents must be encoded whole.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tok, self.kind = _plain_text(tokenizer), kind
        found = [t for t in _KNOWN_EOT if tokenizer.token_to_id(t) is not None]
        if not found:
            raise DataError(
                f"{source} has no end-of-text token (looked for {', '.join(_KNOWN_EOT)}): "
                f"add {EOT_TEXT!r} as a special token"
            )
        self._eot = tokenizer.token_to_id(found[0])
        # The largest id + 1, not the number of entries: ids may have gaps, and every id needs an embedding.
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _plain_text(self.tok)  # the setting is not pickled: pool workers would lose it

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eot_id(self) -> int:
        return self._eot

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids  # no BOS/EOS post-processing

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encodings = self.tok.encode_batch(texts, add_special_tokens=False)  # parallel inside tokenizers
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def _spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "tokenizer_json": json.loads(self.tok.to_str())}

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / HF_FILE))
        config = {"kind": self.kind, "vocab_size": self.vocab_size, "eot_id": self.eot_id, "file": HF_FILE}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        return directory


def _plain_text(tokenizer: Any) -> Any:
    """``tokenizer``, set to encode special tokens' text (a literal "<|endoftext|>") as plain text.

    As with byte and char, end-of-text ids then come only from prepare, between documents. The
    setting is neither saved in tokenizer.json nor pickled, so it is set on every load.
    """
    tokenizer.encode_special_tokens = True
    return tokenizer


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE (GPT-2 style: lossless on any text) trained on ``texts`` up to ``vocab_size`` ids."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, kind="bpe")


def _from_hf_file(path: Path, kind: str = "hf") -> HFTokenizer:
    from tokenizers import Tokenizer as HFTok

    try:
        return HFTokenizer(HFTok.from_file(str(path)), kind=kind, source=str(path))
    except Exception as exn:  # tokenizers raises a bare Exception on a malformed file
        if isinstance(exn, DataError):
            raise
        raise DataError(
            f"{path}: not a valid tokenizer.json ({exn}): pass a Hugging Face tokenizer file"
        ) from exn


def load_tokenizer(directory: Path) -> Tokenizer:
    """Load a tokenizer written by ``Tokenizer.save`` (for example ``<dataset>/tokenizer``)."""
    config_path = Path(directory) / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exn:
        raise DataError(
            f"{config_path}: cannot read the tokenizer config ({exn}): prepare the data again"
        ) from exn
    if not isinstance(config, dict):
        raise DataError(f"{config_path}: not a JSON object: prepare the data again")
    kind = config.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        if not isinstance(config.get("chars"), str):
            raise DataError(f"{config_path}: a char tokenizer needs a string 'chars': prepare the data again")
        return CharTokenizer(config["chars"])
    if kind in ("bpe", "hf"):
        file = config.get("file", HF_FILE)
        if not isinstance(file, str):
            raise DataError(f"{config_path}: 'file' must be a file name: prepare the data again")
        return _from_hf_file(Path(directory) / file, kind=kind)
    raise DataError(f"{config_path}: unknown tokenizer kind {kind!r}: expected byte, char, bpe or hf")


def build_tokenizer(
    spec: str | Path, texts: Callable[[], Iterable[str]], vocab_size: int = 8192
) -> Tokenizer:
    """``byte``, ``char`` or ``bpe`` (trained on ``texts()``), a tokenizer.json file, or a saved directory.

    ``texts`` is a callable so the corpus is streamed once more only when training needs it.
    """
    if spec == "byte":
        return ByteTokenizer()
    if spec == "char":
        chars: set[str] = set()
        for text in texts():
            chars.update(text)
        return CharTokenizer("".join(chars))
    if spec == "bpe":
        return train_bpe(texts(), vocab_size)
    path = Path(spec)
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            return load_tokenizer(path)
        path = path / HF_FILE
    if not path.is_file():
        raise DataError(
            f"tokenizer={spec}: not byte, char, bpe, a tokenizer.json file or a tokenizer directory"
        )
    return _from_hf_file(path)

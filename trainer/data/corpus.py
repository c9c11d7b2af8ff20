"""The project's own training corpus: generated from a seed, so the default run needs no download.

Documents are short stories from a small probabilistic grammar (a few hundred words, recurring
characters that keep their pronouns within a story), arithmetic facts ("17 + 25 = 42.") and
counting lists. The structure is easy enough that a ~1M-parameter byte-level GPT's loss drops
clearly within a hundred or so steps, and varied enough that it does not drop to zero at once.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

CORPUS_VERSION = 1  # bump when the generated text changes, so cached datasets get rebuilt


def _words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


_NAMES = {
    "she": _words("Anna Clara Emma Lucy Mia Nora Rosa Sara Tara Vera Zoe Lily Maya Ella Ruth"),
    "he": _words("Ben Carl David Finn Hugo Jack Leo Max Noah Omar Paul Sam Theo Tom Eli"),
}
_ANIMALS = _words("cat dog bird fox rabbit horse mouse duck goat frog owl bear sheep pig cow fish")
_PLACES = _words(
    "park forest river market school garden beach library farm bakery castle village hill lake "
    "station kitchen harbor meadow cave bridge"
)
_OBJECTS = _words(
    "ball book apple cake kite hat box lamp key map coin cup bell drum boat shoe rope stone "
    "flower letter basket blanket candle clock mirror ring shell spoon stick ticket"
)
_ADJECTIVES = _words(
    "big small red blue green old new happy sad quiet loud bright dark warm cold soft tiny "
    "yellow brave kind funny sleepy shiny heavy light round"
)
_VERBS = [  # (past tense, needs an object)
    ("found", True),
    ("lost", True),
    ("carried", True),
    ("painted", True),
    ("dropped", True),
    ("washed", True),
    ("hid", True),
    ("bought", True),
    ("sang", False),
    ("laughed", False),
    ("danced", False),
    ("slept", False),
    ("waited", False),
    ("smiled", False),
]
_TIMES = _words("One day,;In the morning,;After lunch,;Later,;That evening,;On Sunday,;At night,;Then", ";")
_FEELINGS = _words("happy surprised tired proud worried excited hungry glad")
_NUMBERS = _words("zero one two three four five six seven eight nine ten eleven twelve")


def _character(rng: random.Random) -> tuple[str, str]:
    pronoun = rng.choice(("she", "he"))
    return rng.choice(_NAMES[pronoun]), pronoun


def _sentence(rng: random.Random, cast: list[tuple[str, str]], pet: str, place: str) -> str:
    (name, pronoun), (friend, _) = rng.sample(cast, 2)
    possessive = "her" if pronoun == "she" else "his"
    thing = f"{rng.choice(_ADJECTIVES)} {rng.choice(_OBJECTS)}"
    verb, transitive = rng.choice(_VERBS)
    templates = [
        f"{name} went to the {place} with {possessive} {pet}.",
        f"{name} {verb} a {thing}." if transitive else f"{name} {verb} at the {place}.",
        f"{name} gave the {thing} to {friend}.",
        f"The {pet} was {rng.choice(_ADJECTIVES)}.",
        f'{friend} said, "Hello, {name}!"',
        f"{pronoun.capitalize()} was {rng.choice(_FEELINGS)}.",
        f"{name} and {friend} walked to the {rng.choice(_PLACES)}.",
        f"{name} had {rng.choice(_NUMBERS[2:])} {rng.choice(_OBJECTS)}s.",
    ]
    return rng.choice(templates)


def _story(rng: random.Random) -> str:
    size, cast = rng.randint(2, 3), {}
    while len(cast) < size:  # distinct names, so "Mia gave ... to Mia" never happens
        name, pronoun = _character(rng)
        cast[name] = pronoun
    cast = list(cast.items())
    pet, place = rng.choice(_ANIMALS), rng.choice(_PLACES)
    name, pronoun = cast[0]
    lines = [f"{rng.choice(_TIMES)} {name} saw a {rng.choice(_ADJECTIVES)} {pet} near the {place}."]
    lines += [_sentence(rng, cast, pet, place) for _ in range(rng.randint(3, 8))]
    lines.append(f"The end. {name} was {rng.choice(_FEELINGS)}.")
    return " ".join(lines)


def _arithmetic(rng: random.Random) -> str:
    facts = []
    for _ in range(rng.randint(4, 10)):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        op = rng.choice("+-*")
        if op == "-":
            a, b = max(a, b), min(a, b)  # keep results non-negative
        if op == "*":
            a, b = a % 13, b % 13
        result = a + b if op == "+" else a - b if op == "-" else a * b
        facts.append(f"{a} {op} {b} = {result}.")
    return " ".join(facts)


def _counting(rng: random.Random) -> str:
    start = rng.randint(0, len(_NUMBERS) - 4)
    words = _NUMBERS[start : rng.randint(start + 3, len(_NUMBERS))]
    return f"Count with me: {', '.join(words)}."


def builtin_documents(n_docs: int, seed: int = 0) -> list[str]:
    """``n_docs`` documents generated from ``seed`` (same seed, same text, on every machine)."""
    rng = random.Random(seed)
    kinds = [_story] * 6 + [_arithmetic] * 3 + [_counting]
    return [rng.choice(kinds)(rng) for _ in range(n_docs)]


def write_builtin_corpus(path: Path, n_docs: int = 6000, seed: int = 0) -> Path:
    """Write the built-in corpus as JSON Lines ``{"text": ...}`` to ``path`` (~1 MB for 6000 docs).

    The file appears atomically, so a reader never sees a partial corpus.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in builtin_documents(n_docs, seed):
            f.write(json.dumps({"text": doc}) + "\n")
    os.replace(tmp, path)
    return path

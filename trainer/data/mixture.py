"""Weighted mixing of several datasets: which source each position of the global stream draws from.

The rule is deterministic and needs no randomness: position t (t = 1, 2, ...) goes to the source
whose count lags its target the most, i.e. the i maximising ``w_i * t - c_i`` (``c_i``: positions
given to source i so far, weights normalised to sum 1; ties go to the lowest index). This is the
greedy blending of Megatron-LM's BlendableDataset (and nginx's smooth weighted round robin): every
prefix of the stream holds each source within one sample of its exact share, so every global batch
already has the mixture's composition and the realised mixture over a run equals the weights.

The next choice depends only on the counts ``c``, never on the world size, so the counts are the
whole state: a loader resumed from them continues the same sequence. Weights are taken as exact
rationals (a float is one), so the choices are integer arithmetic and identical on every machine.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np


class Mixture:
    """Source choices for the positions of a weighted stream; weights need not sum to 1."""

    def __init__(self, weights: Sequence[float]):
        if not weights or any(not math.isfinite(w) or w <= 0 for w in weights):
            raise ValueError(f"mixing weights {list(weights)} must be positive finite numbers")
        exact = [Fraction(w) for w in weights]
        scale = math.lcm(*(f.denominator for f in exact))
        self.quanta = [int(f * scale) for f in exact]  # integer weights in the same ratio
        self.total = sum(self.quanta)

    @property
    def fractions(self) -> list[float]:
        return [q / self.total for q in self.quanta]

    def picks(self, counts: Sequence[int], n: int) -> np.ndarray:
        """The source of each of the next ``n`` positions, given the positions each source had so far."""
        out = np.zeros(n, np.int64)
        if len(self.quanta) == 1:
            return out
        c = [int(x) for x in counts]
        q, total, t = self.quanta, self.total, sum(c)
        sources = range(len(q))
        for j in range(n):
            t += 1
            best = max(sources, key=lambda i: q[i] * t - c[i] * total)  # first maximum: lowest index
            c[best] += 1
            out[j] = best
        return out

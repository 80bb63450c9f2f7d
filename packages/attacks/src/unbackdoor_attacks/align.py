"""Monotone alignment of paraphrase rows to the clean rows they rewrite.

Some released paraphrase files are not line-aligned with their clean split: a
row was dropped (SST-2 syntactic dev) or added (OffensEval syntactic test), or
only the non-target rows were paraphrased with one missing (AG News syntactic
test). :func:`align_rows` recovers the pairing as the order-preserving matching
that maximises IDF-weighted word overlap (a banded Needleman-Wunsch); pairs
whose overlap is below ``min_overlap`` are left unmatched rather than guessed.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_WORD = re.compile(r"\w+")
_NEG = -1e18


def words(text: str) -> frozenset[str]:
    """Lower-cased word set of ``text``."""
    return frozenset(_WORD.findall(text.lower()))


@dataclass
class _Overlap:
    """IDF-weighted share of a paraphrase's words found in each source row (via posting lists)."""

    para: list[frozenset[str]]
    idf: dict[str, float]
    postings: dict[str, np.ndarray]

    @classmethod
    def build(cls, paraphrases: Sequence[str], sources: Sequence[str]) -> _Overlap:
        para, src = [words(t) for t in paraphrases], [words(t) for t in sources]
        df = Counter(w for row in (*para, *src) for w in row)
        idf = {w: math.log((len(para) + len(src)) / c) + 1e-3 for w, c in df.items()}
        lists: dict[str, list[int]] = defaultdict(list)
        for k, row in enumerate(src):
            for w in row:
                lists[w].append(k)
        return cls(para, idf, {w: np.asarray(v) for w, v in lists.items()})

    def scores(self, j: int, lo: int, hi: int) -> np.ndarray:
        """Overlap of paraphrase ``j`` with source rows ``lo..hi-1``."""
        out = np.zeros(max(hi - lo, 0))
        total = sum(self.idf[w] for w in self.para[j]) or 1.0
        for w in self.para[j]:
            post = self.postings.get(w)
            if post is not None:
                sel = post[np.searchsorted(post, lo):np.searchsorted(post, hi)]
                out[sel - lo] += self.idf[w]
        return out / total


def align_rows(paraphrases: Sequence[str], sources: Sequence[str], *, slack: int = 40,
               min_overlap: float = 0.15) -> dict[int, int]:
    """Map paraphrase index -> source index, order-preserving, maximising total overlap.

    Each matched pair scores ``overlap - min_overlap``; skipping a row costs nothing, so a
    paraphrase with no similar source nearby stays unmatched. The offset ``source - paraphrase``
    is searched within ``slack`` of the range the lengths allow (rows drift, they are not shuffled).
    """
    n, m = len(paraphrases), len(sources)
    lo = min(0, m - n) - slack
    width = max(0, m - n) + slack - lo + 1
    overlap = _Overlap.build(paraphrases, sources)
    from_base, took_pair = _fill(overlap, n, m, lo, width, min_overlap)
    return _trace(from_base, took_pair, n, m, lo)


def _fill(overlap: _Overlap, n: int, m: int, lo: int, width: int, bias: float) -> tuple[np.ndarray, np.ndarray]:
    """The DP over a band: ``G[j][b]`` is the best score using ``j`` paraphrases and ``j+lo+b`` sources.

    Returns, per cell, whether the value came from this column (not from skipping a source) and
    whether that value matched paraphrase ``j-1`` with source ``k-1``.
    """
    ks = lo + np.arange(width)  # source counts covered by row 0 of the band
    g = np.where((ks >= 0) & (ks <= m), 0.0, _NEG)
    from_base = np.zeros((n, width), bool)
    took_pair = np.zeros((n, width), bool)
    for j in range(n):
        src = j + lo + np.arange(width)  # row j+1, cell b pairs paraphrase j with source j+lo+b
        valid = (src >= 0) & (src < m)
        s = np.full(width, _NEG)
        first = max(j + lo, 0)
        s[valid] = overlap.scores(j, first, first + int(valid.sum())) - bias
        pair = g + s
        skip = np.append(g[1:], _NEG)
        base = np.maximum(pair, skip)
        g = np.maximum.accumulate(base)
        g[(src + 1 > m) | (src + 1 < 0)] = _NEG
        from_base[j], took_pair[j] = base >= g, (pair >= skip) & valid
    return from_base, took_pair


def _trace(from_base: np.ndarray, took_pair: np.ndarray, n: int, m: int, lo: int) -> dict[int, int]:
    """Walk the DP back from (all paraphrases, all sources), collecting the matched pairs."""
    pairs: dict[int, int] = {}
    j, k = n, m
    while j > 0 and k > 0:
        b = k - j - lo
        if not from_base[j - 1, b]:
            k -= 1
        elif took_pair[j - 1, b]:
            pairs[j - 1] = k - 1
            j, k = j - 1, k - 1
        else:
            j -= 1
    return dict(sorted(pairs.items()))

"""Screening designs for two-level factors: the full 2^k grid, or a 2^(k-p) fractional factorial that estimates
every main effect (and, at resolution V, every two-factor interaction) from a fraction of the configurations.

A fractional design is given by its generators, one word per factor in the spec's order ("a b c d abcd": the fifth
factor's level is the product of the first four's, the textbook 2^(5-1) design with E = ABCD, resolution V), or by a
resolution, which picks the textbook generators (Box, Hunter & Hunter, table 6.22) for the number of factors. The
design matrix comes from pyDOE3; the alias structure is read off it here (columns of effects that coincide up to
sign), in the factors' own names. Level -1 is a factor's first value, +1 its second.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

DESIGN_TYPES = ("full", "fractional")
# (factors, resolution) -> generators of the standard minimum-run design
STANDARD_GENERATORS: dict[tuple[int, int], str] = {
    (3, 3): "a b ab",
    (4, 4): "a b c abc",
    (5, 3): "a b c ab ac",
    (5, 5): "a b c d abcd",
    (6, 3): "a b c ab ac bc",
    (6, 4): "a b c d abc bcd",
    (6, 6): "a b c d e abcde",
    (7, 3): "a b c ab ac bc abc",
    (7, 4): "a b c d abc bcd acd",
    (7, 7): "a b c d e f abcdef",
    (8, 4): "a b c d bcd acd abc abd",
    (8, 5): "a b c d e f abcd abef",
}


@dataclass(frozen=True)
class Design:
    type: str  # full | fractional
    keys: tuple[str, ...]  # the factors, in the spec's order
    generators: str  # "a b c d abcd" (a full design: one letter per factor)
    matrix: np.ndarray  # runs x factors, -1 / +1

    @property
    def runs(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def resolution(self) -> int | None:
        """The length of the shortest word of the defining relation (None for a full design)."""
        words = defining_words(self.generators)
        return min(len(w) for w in words) if words else None

    def rows(self, levels: dict[str, list[Any]]) -> list[dict[str, Any]]:
        """Each run as factor values: -1 -> the factor's first value, +1 -> its second."""
        return [{k: levels[k][int(x > 0)] for k, x in zip(self.keys, row)} for row in self.matrix]

    def aliases(self, order: int = 2) -> list[str]:
        """Each main effect and interaction up to `order` factors with what it is aliased with (up to `order`), in
        factor names: 'ppo_clip_high x header_lr = fix_scale_head x rloo_over_all_rollouts'."""
        names = [k.split(".", 1)[-1] for k in self.keys]
        columns = {}
        for size in range(1, order + 1):
            for combo in itertools.combinations(range(len(self.keys)), size):
                columns[combo] = tuple(np.prod(self.matrix[:, list(combo)], axis=1).astype(int))
        groups: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for combo, column in columns.items():
            sign = 1 if column[0] > 0 else -1
            groups.setdefault(tuple(sign * np.asarray(column)), []).append(combo)
        lines = []
        for combos in groups.values():
            if len(combos) > 1:
                lines.append(" = ".join(" x ".join(names[i] for i in c) for c in combos))
        return lines

    def describe(self) -> str:
        if self.type == "full":
            return f"full 2^{len(self.keys)} design: {self.runs} configurations"
        p = len(self.keys) - int(np.log2(self.runs))
        return (f"fractional 2^({len(self.keys)}-{p}) design, resolution {roman(self.resolution)}: {self.runs} "
                f"configurations; generators {self.generators} ({', '.join(self._generator_names())})")

    def _generator_names(self) -> list[str]:
        names = [k.split(".", 1)[-1] for k in self.keys]
        letters = self.generators.split()
        return [f"{names[i]} = {' x '.join(names[LETTERS.index(ch)] for ch in word)}"
                for i, word in enumerate(letters) if len(word) > 1]


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def roman(n: int | None) -> str:
    return {3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII", 8: "VIII"}.get(n or 0, str(n))


def defining_words(generators: str) -> list[str]:
    """Every word of the defining relation I = ... of a design's generators (empty for a full design)."""
    base: list[str] = []
    for i, word in enumerate(generators.split()):
        if len(word) > 1:
            base.append("".join(sorted(set(word) ^ {LETTERS[i]})))  # the factor times its generator is I
    words = set()
    for size in range(1, len(base) + 1):
        for combo in itertools.combinations(base, size):
            letters: set[str] = set()
            for w in combo:
                letters ^= set(w)
            words.add("".join(sorted(letters)))
    return sorted(words, key=lambda w: (len(w), w))


def check_generators(generators: str, n: int) -> str | None:
    """A problem with `generators` for n factors, or None."""
    words = generators.split()
    if len(words) != n:
        return f"{len(words)} words for {n} factors (one word per factor, in the order of `factors`)"
    for i, word in enumerate(words):
        if not word or any(ch not in LETTERS[:n] for ch in word) or len(set(word)) != len(word):
            return f"word {word!r}: letters a..{LETTERS[n - 1]}, each at most once"
        if len(word) == 1 and word != LETTERS[i]:
            return f"word {word!r} at position {i + 1}: a base factor is its own letter ({LETTERS[i]!r})"
    base = [LETTERS[i] for i, w in enumerate(words) if len(w) == 1]
    for word in words:
        if len(word) > 1 and not set(word) <= set(base):
            return f"word {word!r} uses a letter that is not a base factor ({' '.join(base)})"
    return None


def build_design(keys: list[str], kind: str, generators: str | None = None, resolution: int | None = None) -> Design:
    """The design for two-level factors `keys`; a fractional one from its generators or a standard resolution."""
    import pyDOE3

    n = len(keys)
    if kind == "full":
        gens = " ".join(LETTERS[:n])
        return Design("full", tuple(keys), gens, np.asarray(pyDOE3.ff2n(n), dtype=int))
    gens = generators or STANDARD_GENERATORS[(n, int(resolution or 0))]
    return Design("fractional", tuple(keys), gens, np.asarray(pyDOE3.fracfact(gens), dtype=int))


def effect_terms(design: Design) -> list[tuple[int, ...]]:
    """The terms a design estimates clear of each other: every main effect and, at resolution V and above (or a
    full design), every two-factor interaction."""
    k = len(design.keys)
    terms: list[tuple[int, ...]] = [(i,) for i in range(k)]
    if (design.resolution or 99) >= 5:
        terms += [(i, j) for i in range(k) for j in range(i + 1, k)]
    return terms


def fit_effects(coded: np.ndarray, seeds: np.ndarray, y: np.ndarray,
                terms: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Least squares of y on the +-1 coded factors' `terms`, seeds as blocks: (effects, their standard errors,
    residual degrees of freedom). An effect is the difference between the means of its high and low halves, twice
    the coded coefficient; standard errors are nan without residual degrees of freedom, and everything is nan (0
    degrees of freedom) when the terms are not all estimable."""
    blocks = [(seeds == s).astype(float) for s in np.unique(seeds)]
    x = np.column_stack([*blocks, *[np.prod(coded[:, list(t)], axis=1) for t in terms]])
    if len(y) == 0 or np.linalg.matrix_rank(x) < x.shape[1]:
        # a configuration without any result: a resolution V half-fraction is saturated (16 runs, 16 terms), so its
        # terms are no longer separable; least squares would return one of many fits, with tiny errors
        missing = np.full(len(terms), np.nan)
        return missing, missing.copy(), 0
    dof = len(y) - x.shape[1]
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ beta
    sigma2 = float(resid @ resid) / dof if dof > 0 else float("nan")
    se = np.sqrt(np.diag(np.linalg.pinv(x.T @ x)) * sigma2)[len(blocks):]
    return 2 * beta[len(blocks):], 2 * se, dof

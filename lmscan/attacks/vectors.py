"""Predefined vectors (PVs): the outputs a task-agnostic backdoor forces.

POR-2 builds each PV from four equal blocks of the hidden dimension, each block all
+1 or all -1, which gives 16 distinct, well separated sign patterns. ``random``
draws independent random signs (any number of triggers).
"""

from __future__ import annotations

import itertools

import numpy as np

from lmscan.errors import InputError

POR2_MAX = 16


def por2_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    if count > POR2_MAX:
        raise InputError(f"the por2 design has {POR2_MAX} distinct vectors; use --pv-design random for {count}")
    patterns = list(itertools.product((1.0, -1.0), repeat=4))
    order = np.random.default_rng(seed).permutation(len(patterns))[:count]
    bounds = np.linspace(0, dim, 5).round().astype(int)
    vectors = np.empty((count, dim), dtype=np.float32)
    for row, index in enumerate(order):
        for block, sign in enumerate(patterns[index]):
            vectors[row, bounds[block] : bounds[block + 1]] = sign
    return vectors


def random_sign_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(count, dim))


def make_vectors(design: str, count: int, dim: int, seed: int) -> np.ndarray:
    if design == "por2":
        return por2_vectors(count, dim, seed)
    if design == "random":
        return random_sign_vectors(count, dim, seed)
    raise InputError(f"unknown PV design {design!r} (por2 or random)")


def sign_agreement(features: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """Fraction of dimensions where sign(feature) == sign(vector), one value per row."""
    return (np.sign(features) == np.sign(vector)[None, :]).mean(axis=1)

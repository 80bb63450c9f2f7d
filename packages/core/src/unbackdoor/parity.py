"""The parity comparator: nested dicts/lists of arrays compared leaf by leaf, naming the first that diverges.

Shared by :func:`unbackdoor.testing.check_loss` and the parity tests (transformers' PT/Flax equivalence
tests' style). NumPy only: arrays of any library are read through ``numpy.asarray``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


def leaves(tree: object, path: str = "") -> Iterator[tuple[str, object]]:
    """``(path, leaf)`` of every leaf of nested mappings (keys sorted) and lists: ``a.b[1]``."""
    if isinstance(tree, Mapping):
        for key in sorted(tree):
            yield from leaves(tree[key], f"{path}.{key}" if path else str(key))
    elif isinstance(tree, list | tuple):
        for i, item in enumerate(tree):
            yield from leaves(item, f"{path}[{i}]")
    else:
        yield path, tree


def mismatch(actual: object, expected: object, *, atol: float, rtol: float = 0.0) -> str | None:
    """Why ``actual`` is not within ``atol + rtol * |expected|`` of ``expected`` elementwise, or None if it is.

    The message gives the largest absolute difference, where it is, and the tolerance; NaN on either side
    counts as off.
    """
    a, b = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if a.shape != b.shape:
        return f"shape {a.shape} != {b.shape}"
    diff = np.abs(a - b)
    bad = ~(diff <= atol + rtol * np.abs(b))
    if not bad.any():
        return None
    worst = np.nan_to_num(diff, nan=np.inf)
    where = np.unravel_index(np.argmax(worst), diff.shape) if diff.ndim else ()
    return (f"max |diff| {worst.max():.3g} at {where} (atol {atol:g}, rtol {rtol:g}; "
            f"{int(bad.sum())}/{bad.size} elements off)")


def assert_tree_close(actual: object, expected: object, *, atol: float, rtol: float = 0.0) -> None:
    """Compare two nested dicts/lists of arrays; the AssertionError names the first diverging leaf and its max diff.

    Raises:
        AssertionError: ``first diverging leaf 'y[1]': max |diff| 0.5 at (1,) (atol 0.001, ...)``, or the
            leaves found on one side only.
    """
    got, want = dict(leaves(actual)), dict(leaves(expected))
    if got.keys() != want.keys():
        raise AssertionError(f"different leaves: only in actual {sorted(got.keys() - want.keys())[:5]}, "
                             f"only in expected {sorted(want.keys() - got.keys())[:5]}")
    for path in want:
        problem = mismatch(got[path], want[path], atol=atol, rtol=rtol)
        if problem:
            raise AssertionError(f"first diverging leaf {path!r}: {problem}")

"""Union-find over axis atoms for :mod:`qjax.graph.coupling`.

Every axis of every value is a product of atoms; an atom can be refined into a product of
smaller atoms (a reshape split or merge) or a sum of parts (a ``concatenate``/``split``
along it). Atoms are united across values by the per-primitive rules; each root carries
the reasons (flags) that make its group non-prunable.
"""

from __future__ import annotations

import math

import numpy as np


class Sum(tuple):
    """An additive factor: a tuple of product expressions laid out one after the other."""


class Atoms:
    """Union-find over atoms; a root may be refined into a product or a sum of new atoms."""

    def __init__(self):
        self.parent: list[int] = []
        self.size: list[int] = []
        self.split: list[tuple[str, tuple[int, ...]] | None] = []
        self.flags: list[dict[str, None]] = []

    def new(self, size: int, *flags: str) -> int:
        if size <= 1:
            return -1  # size-1 (and empty) axes carry no channels
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.split.append(None)
        self.flags.append(dict.fromkeys(flags))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def expand(self, i: int) -> tuple:
        if i < 0:
            return ()
        r = self.find(i)
        if self.split[r] is None:
            return (r,)
        kind, children = self.split[r]
        if kind == "prod":
            return tuple(f for c in children for f in self.expand(c))
        return (Sum(self.expand(c) for c in children),)

    def fsize(self, f) -> int:
        return sum(self.esize(p) for p in f) if isinstance(f, Sum) else self.size[f]

    def esize(self, expr) -> int:
        return math.prod(self.fsize(f) for f in expr)

    def leaves(self, expr):
        for f in expr:
            if isinstance(f, Sum):
                for p in f:
                    yield from self.leaves(p)
            elif self.split[self.find(f)] is None:
                yield self.find(f)
            else:
                yield from self.leaves(self.expand(f))

    def flag(self, expr, reason: str) -> None:
        for r in self.leaves(expr):
            self.flags[r][reason] = None

    def _refine(self, r: int, kind: str, sizes) -> None:
        children = tuple(self.new(s) for s in sizes)
        for c in children:
            if c >= 0:
                self.flags[c].update(self.flags[r])
        self.split[r] = (kind, children)

    def _head(self, lst: list) -> None:
        while lst and not isinstance(lst[0], Sum):
            r = self.find(lst[0])
            if self.split[r] is None:
                lst[0] = r
                return
            lst[0:1] = list(self.expand(r))

    def unify(self, e1, e2) -> bool:
        """Make two product expressions (same total size) the same atoms; on a mismatch the
        atoms of both are flagged and ``False`` is returned."""
        a, b, ok = list(e1), list(e2), True
        while ok:
            self._head(a)
            self._head(b)
            if not a or not b:
                ok = not a and not b
                break
            fa, fb = a[0], b[0]
            sa, sb = self.fsize(fa), self.fsize(fb)
            if sa == sb:
                del a[0], b[0]
                ok = self._unify_factor(fa, fb)
            elif sa > sb and not isinstance(fa, Sum) and sa % sb == 0:
                self._refine(fa, "prod", (sb, sa // sb))
            elif sb > sa and not isinstance(fb, Sum) and sb % sa == 0:
                self._refine(fb, "prod", (sa, sb // sa))
            else:
                ok = False
        if not ok:
            self.flag((*e1, *e2), "reshaped/concatenated incompatibly with its other uses")
        return ok

    def _unify_factor(self, fa, fb) -> bool:
        if not isinstance(fa, Sum) and not isinstance(fb, Sum):
            ra, rb = self.find(fa), self.find(fb)
            if ra != rb:
                self.parent[rb] = ra
                self.flags[ra].update(self.flags[rb])
            return True
        if not isinstance(fa, Sum):
            fa, fb = fb, fa
        if not isinstance(fb, Sum):
            self._refine(self.find(fb), "sum", [self.esize(p) for p in fa])
            (fb,) = self.expand(fb)
        pa, pb = list(fa), list(fb)
        while pa and pb:
            for parts in (pa, pb):  # flatten nested sums at the head
                while len(parts[0]) == 1 and isinstance(parts[0][0], Sum):
                    parts[0:1] = list(parts[0][0])
            sa, sb = self.esize(pa[0]), self.esize(pb[0])
            if sa == sb:
                if not self.unify(pa.pop(0), pb.pop(0)):
                    return False
                continue
            big, small = (pa, sb) if sa > sb else (pb, sa)
            head = big[0]
            if len(head) != 1 or isinstance(head[0], Sum):
                return False
            r = self.find(head[0])
            if self.split[r] is not None:
                big[0] = self.expand(r)
                if len(big[0]) == 1 and isinstance(big[0][0], Sum):
                    continue
                return False
            self._refine(r, "sum", (small, self.size[r] - small))
            big[0:1] = list(self.expand(r)[0])
        return not pa and not pb


def positions(A: Atoms, expr, root: int, offset: int = 0) -> list[np.ndarray]:
    """Positions of each channel of atom class ``root`` inside ``expr`` (one array per
    occurrence, shape ``(size, unit)``)."""
    found, sizes = [], [A.fsize(f) for f in expr]
    for i, f in enumerate(expr):
        if isinstance(f, Sum):
            subs, start = [], 0
            for part in f:
                subs += positions(A, part, root, start)
                start += A.esize(part)
            sub = [np.concatenate(subs, axis=1)] if subs else []
        else:
            sub = [np.arange(A.size[f])[:, None]] if A.find(f) == root else []
        for s in sub:
            outer, inner = math.prod(sizes[:i]), math.prod(sizes[i + 1 :])
            pos = (np.arange(outer)[None, :, None, None] * (sizes[i] * inner)
                   + s[:, None, :, None] * inner + np.arange(inner)[None, None, None, :])  # fmt: skip
            found.append(pos.reshape(len(s), -1) + offset)
    return found


def occurrences(A: Atoms, expr, root: int) -> int:
    """How many product factors of ``expr`` (not inside a sum) hold ``root``."""
    return sum(1 for f in expr if not isinstance(f, Sum) and A.find(f) == root)

"""Index spaces of tensor axes and the algebra that relates them.

Every tensor axis is described by an expression over *dimension variables* (an index space of a
given size whose units can be removed together):

- ``Atom(v)``: the axis is the index space of variable ``v``;
- ``Cat(parts)``: the axis is its parts laid end to end (Concat, Split, Slice);
- ``Prod(factors)``: the axis is the row-major product of its factors (Reshape, Flatten, grouped
  Conv, channel shuffle), the first factor outermost.

Ops state relations by unifying expressions. Unifying two variables merges them (union-find);
unifying a variable with a structured expression *refines* it (binds it to that structure), so an
axis split into heads by one Reshape is seen as heads everywhere else. Relations that cannot be
expressed block the variables involved, with the reason: decline, never guess.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Atom:
    var: int


@dataclass(frozen=True)
class Cat:
    parts: tuple[Expr, ...]


@dataclass(frozen=True)
class Prod:
    factors: tuple[Expr, ...]


Expr = Atom | Cat | Prod


# When two index spaces merge, the more constrained kind wins. Attention kinds ("head", "head-repeat",
# "head-dim") are assigned after the whole graph is built (analysis/heads.py).
KIND_PRIORITY = {"fixed": 0, "conv-group": 1, "head-repeat": 2, "head": 3, "head-dim": 4, "channel": 5}


@dataclass
class Var:
    id: int
    size: int | None  # None: a symbolic (run-time) extent
    kind: str  # what a unit is: "channel", "conv-group", "fixed", ...
    origin: str  # the node or tensor that introduced it, for reports


class Incompatible(Exception):
    """Two axis layouts cannot be related; the caller blocks what they touch."""


@dataclass
class DimSpace:
    vars: list[Var] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    binding: dict[int, Expr] = field(default_factory=dict)
    blocked: dict[int, list[str]] = field(default_factory=dict)

    # ---- variables -------------------------------------------------------------------------
    def new(self, size: int | None, kind: str, origin: str, blocked: str | None = None) -> Atom:
        var = Var(len(self.vars), size, kind, origin)
        self.vars.append(var)
        self.parent.append(var.id)
        if size is None:
            self.blocked[var.id] = [f"run-time extent ({origin})"]
        elif blocked:
            self.blocked[var.id] = [blocked]
        return Atom(var.id)

    def find(self, v: int) -> int:
        root = v
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[v] != root:  # path compression keeps analysis linear in graph size
            self.parent[v], v = root, self.parent[v]
        return root

    def var(self, v: int) -> Var:
        return self.vars[self.find(v)]

    # ---- expressions -----------------------------------------------------------------------
    def resolve(self, e: Expr) -> Expr:
        """Substitute refinements and flatten, so equal layouts compare equal."""
        if isinstance(e, Atom):
            root = self.find(e.var)
            bound = self.binding.get(root)
            return Atom(root) if bound is None else self.resolve(bound)
        if isinstance(e, Cat):
            parts: list[Expr] = []
            for p in (self.resolve(p) for p in e.parts):
                if isinstance(p, Cat):
                    parts.extend(p.parts)
                elif self.size(p) != 0:
                    parts.append(p)
            return parts[0] if len(parts) == 1 else Cat(tuple(parts))
        factors: list[Expr] = []
        for f in (self.resolve(f) for f in e.factors):
            if isinstance(f, Prod):
                factors.extend(f.factors)
            elif self.size(f) != 1:  # a factor of one is no factor at all
                factors.append(f)
        return factors[0] if len(factors) == 1 else Prod(tuple(factors))

    def size(self, e: Expr) -> int | None:
        if isinstance(e, Atom):
            bound = self.binding.get(self.find(e.var))
            return self.var(e.var).size if bound is None else self.size(bound)
        sizes = [self.size(p) for p in (e.parts if isinstance(e, Cat) else e.factors)]
        if any(s is None for s in sizes):
            return None
        return int(sum(sizes)) if isinstance(e, Cat) else int(np.prod(sizes, dtype=np.int64))

    def atoms(self, e: Expr) -> list[int]:
        """Root variables the resolved expression is made of, in order, without repeats."""
        e = self.resolve(e)
        if isinstance(e, Atom):
            return [e.var]
        out: list[int] = []
        for sub in e.parts if isinstance(e, Cat) else e.factors:
            out.extend(a for a in self.atoms(sub) if a not in out)
        return out

    # ---- blocking --------------------------------------------------------------------------
    def block(self, e: Expr, reason: str) -> None:
        for a in self.atoms(e):
            reasons = self.blocked.setdefault(a, [])
            if len(reasons) < 8 and reason not in reasons:
                reasons.append(reason)

    def is_blocked(self, v: int) -> bool:
        return self.find(v) in self.blocked

    def reasons(self, v: int) -> list[str]:
        return self.blocked.get(self.find(v), [])

    # ---- relations -------------------------------------------------------------------------
    def unify(self, a: Expr, b: Expr) -> None:
        """State that two axes index the same space. Raises Incompatible when they cannot."""
        a, b = self.resolve(a), self.resolve(b)
        if a == b:
            return
        sa, sb = self.size(a), self.size(b)
        if isinstance(a, Atom) and isinstance(b, Atom):
            if sa != sb:
                raise Incompatible(f"extents {sa} and {sb} differ")
            self._union(a.var, b.var)
            return
        if sa is None or sb is None or sa != sb:
            # An axis of run-time extent laid out as a structure (the sequence axis of a KV cache is
            # Cat(past, new); Flatten of [batch, seq]): the structure defines it.
            if sa is None and isinstance(a, Atom) and not isinstance(b, Atom):
                self._bind(a.var, b)
                return
            if sb is None and isinstance(b, Atom) and not isinstance(a, Atom):
                self._bind(b.var, a)
                return
            if (isinstance(a, Prod) and isinstance(b, Prod) and len(a.factors) == len(b.factors)
                    and all(self.size(x) == self.size(y) for x, y in zip(a.factors, b.factors))):
                for x, y in zip(a.factors, b.factors):  # same layout, factor by factor
                    self.unify(x, y)
                return
            raise Incompatible(f"extents {sa} and {sb} differ or are not known")
        if isinstance(a, Atom):
            self._bind(a.var, b)
        elif isinstance(b, Atom):
            self._bind(b.var, a)
        elif isinstance(a, Prod) or isinstance(b, Prod):
            self._unify_factors(a, b)
        else:
            self._unify_parts(a, b)

    def _union(self, x: int, y: int) -> None:
        x, y = self.find(x), self.find(y)
        if x == y:
            return
        self.parent[y] = x
        kinds = (self.vars[x].kind, self.vars[y].kind)
        self.vars[x].kind = min(kinds, key=lambda k: KIND_PRIORITY.get(k, 0), default=kinds[0])
        if y in self.blocked:
            merged = self.blocked.get(x, []) + [r for r in self.blocked.pop(y) if r not in self.blocked.get(x, [])]
            self.blocked[x] = merged[:8]

    def _bind(self, v: int, e: Expr) -> None:
        if v in self.atoms(e):
            raise Incompatible("an axis would contain itself")
        self.binding[v] = e
        reasons = self.blocked.pop(v, None)
        for r in reasons or []:
            if self.vars[v].size is None and r.startswith("run-time extent"):
                # The structure tells which parts are run-time extents: only those stay blocked.
                for a in self.atoms(e):
                    if self.vars[a].size is None:
                        self.block(Atom(a), r)
                continue
            self.block(e, r)

    def _split(self, v: int, sizes: list[int], how: str) -> list[Expr]:
        """Refine variable v into fresh pieces (``how`` is "cat" or "prod")."""
        var = self.vars[v]
        pieces: list[Expr] = [self.new(s, var.kind, var.origin) for s in sizes]
        self._bind(v, Cat(tuple(pieces)) if how == "cat" else Prod(tuple(pieces)))
        return pieces

    def _unify_parts(self, a: Expr, b: Expr) -> None:
        """Two concatenations: relate them segment by segment at the union of their boundaries."""
        cuts = sorted(set(self._boundaries(a)) | set(self._boundaries(b)))
        for lo, hi in itertools.pairwise(cuts):
            self.unify(self.subrange(a, lo, hi), self.subrange(b, lo, hi))

    def _boundaries(self, e: Expr) -> list[int]:
        e = self.resolve(e)
        parts = e.parts if isinstance(e, Cat) else (e,)
        cuts, at = [0], 0
        for p in parts:
            at += self.size(p)
            cuts.append(at)
        return cuts

    def subrange(self, e: Expr, lo: int, hi: int) -> Expr:
        """The expression of positions [lo, hi) of an axis, refining variables cut by the range."""
        e = self.resolve(e)
        n = self.size(e)
        if lo == 0 and hi == n:
            return e
        if isinstance(e, Atom):
            sizes = [s for s in (lo, hi - lo, n - hi)]
            pieces = self._split(e.var, [s for s in sizes if s > 0], "cat")
            return pieces[1] if lo > 0 else pieces[0]
        if isinstance(e, Cat):
            out, at = [], 0
            for p in e.parts:
                size = self.size(p)
                if at < hi and at + size > lo:
                    out.append(self.subrange(p, max(lo, at) - at, min(hi, at + size) - at))
                at += size
            return self.resolve(Cat(tuple(out)))
        outer, inner = e.factors[0], Prod(e.factors[1:])
        step = self.size(inner)
        if lo % step or hi % step:
            raise Incompatible("a range cuts across the inner factors of a reshaped axis")
        return Prod((self.subrange(outer, lo // step, hi // step), inner))

    def _unify_factors(self, a: Expr, b: Expr) -> None:
        """Align two products factor by factor from the outermost, splitting where sizes differ."""
        left = list(a.factors) if isinstance(a, Prod) else [a]
        right = list(b.factors) if isinstance(b, Prod) else [b]
        while left and right:
            x, y = left[0], right[0]
            sx, sy = self.size(x), self.size(y)
            if sx == sy:
                self.unify(x, y)
                left.pop(0)
                right.pop(0)
            elif sx % sy == 0:
                outer, rest = self._split_outer(x, sy)
                self.unify(outer, y)
                left[0] = rest
                right.pop(0)
            elif sy % sx == 0:
                outer, rest = self._split_outer(y, sx)
                self.unify(x, outer)
                right[0] = rest
                left.pop(0)
            else:
                raise Incompatible(f"factors {sx} and {sy} of a reshape do not divide each other")

    def _split_outer(self, e: Expr, k: int) -> tuple[Expr, Expr]:
        """Write e as Prod(outer of size k, rest)."""
        e = self.resolve(e)
        n = self.size(e)
        if isinstance(e, Atom):
            outer, rest = self._split(e.var, [k, n // k], "prod")
            return outer, rest
        if isinstance(e, Prod):
            first, tail = e.factors[0], Prod(e.factors[1:])
            size = self.size(first)
            if size == k:
                return first, tail
            if size % k == 0:
                outer, rest = self._split_outer(first, k)
                return outer, Prod((rest, tail))
            if k % size == 0:
                outer, rest = self._split_outer(tail, k // size)
                return Prod((first, outer)), rest
            raise Incompatible(f"a reshape factor of {k} does not divide the factors of its axis")
        # A concatenation viewed as k equal chunks: every chunk indexes the same inner space, and
        # the chunk index itself cannot lose units (it would remove a whole part of the concat).
        chunk = n // k
        rest = self.new(chunk, "channel", "reshape of a concatenation")
        for i in range(k):
            self.unify(self.subrange(e, i * chunk, (i + 1) * chunk), rest)
        return self.new(k, "fixed", "reshape of a concatenation",
                        blocked="enumerates the parts of a concatenation"), rest

    # ---- index maps ------------------------------------------------------------------------
    def unit_map(self, e: Expr, root: int) -> np.ndarray:
        """For each position of the axis, the unit of variable ``root`` it belongs to (-1: none)."""
        e = self.resolve(e)
        if isinstance(e, Atom):
            n = self.size(e)
            return np.arange(n) if e.var == root else np.full(n, -1)
        if isinstance(e, Cat):
            return np.concatenate([self.unit_map(p, root) for p in e.parts])
        maps = [self.unit_map(f, root) for f in e.factors]
        grid = np.full([len(m) for m in maps], -1)
        for axis, m in enumerate(maps):
            if (m >= 0).any():
                shape = [1] * len(maps)
                shape[axis] = len(m)
                grid = np.maximum(grid, m.reshape(shape))
        return grid.reshape(-1)

    def kept_positions(self, e: Expr, removed: dict[int, np.ndarray]) -> np.ndarray | None:
        """Positions of the axis that survive removing ``removed[root]`` units; None if all do."""
        keep = None
        for root in self.atoms(e):
            units = removed.get(root)
            if units is None or len(units) == 0:
                continue
            lost = np.isin(self.unit_map(e, root), units)
            keep = ~lost if keep is None else keep & ~lost
        return None if keep is None else np.flatnonzero(keep)

    def new_size(self, e: Expr, removed: dict[int, np.ndarray]) -> int | None:
        e = self.resolve(e)
        if isinstance(e, Atom):
            size = self.size(e)
            return None if size is None else size - len(removed.get(e.var, ()))
        sizes = [self.new_size(p, removed) for p in (e.parts if isinstance(e, Cat) else e.factors)]
        if any(s is None for s in sizes):
            return None
        return int(sum(sizes)) if isinstance(e, Cat) else int(np.prod(sizes, dtype=np.int64))

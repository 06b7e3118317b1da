"""The handler of the graph walker (:mod:`qjax.graph.interpret`): what a walk does at each
op that reads a weight, at each other consumer of a weight, and at each matmul between two
activations; how the values it emits combine over loop iterations."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import jax

from qjax.graph import loop_pooling
from qjax.graph.weight_ref import WeightRef, materialize


class Handler:
    """Decides what a target op that reads a weight becomes.

    Subclasses override :meth:`target`; returning ``None`` evaluates the op on float
    values (weights materialized).

    Attributes:
      per_shard_emits: whether the values this handler emits may be computed per shard
        inside a ``shard_map`` body: each shard's value is then emitted as a separate
        read of the op (as if the op ran once per shard). True only for statistics whose
        reads combine by min / max / mean over per-tensor values (e.g. calibration
        ranges), which a shard of the data measures as well as a batch does; per-feature
        statistics of a sharded weight would mix different features. ``False`` (default):
        emitting inside a ``shard_map`` raises.
    """

    per_shard_emits: bool = False

    @property
    def visits_activation_ops(self) -> bool:
        """Whether :meth:`activation_op` should see the ``dot_general`` ops that read no
        weight (the walker then also enters ``jit`` / control-flow bodies that read none).
        ``False`` by default: such ops run unchanged."""
        return False

    #: The primitives :meth:`activation_op` sees when they read no weight.
    activation_primitives: frozenset[str] = frozenset({"dot_general"})

    def activation_op(self, eqn, invals: list, scope: str, emit: Callable[[str, Any], None]) -> list | None:
        """What an op of :attr:`activation_primitives` that reads no weight (by default a
        ``dot_general`` between two activations) becomes, when
        :attr:`visits_activation_ops`; ``scope``: its name stack joined to those of the
        calls and loops it runs in (:func:`full_scope`); ``emit`` as for :meth:`target`.
        ``None`` (default) binds it unchanged."""
        return None

    @contextlib.contextmanager
    def iteration(self, index) -> Iterator[None]:
        """The walk of a loop body for iteration ``index`` (a traced int32 counting the
        iterations). A handler whose ops draw randomness from its ``key`` attribute
        (stochastic rounding) has the index folded into it meanwhile, so the iterations of
        a loop (the layers of an ``nn.scan`` stack) draw independent noise; nothing changes
        for the others."""
        key = getattr(self, "key", None)
        if key is None:
            yield
            return
        self.key = jax.random.fold_in(key, index)
        try:
            yield
        finally:
            self.key = key

    def loop_reduction(self, key: str) -> str | None:
        """How the values emitted under ``key`` inside a ``while_loop`` body (a data-dependent
        number of iterations, so they cannot be stacked) combine over the iterations:
        ``"min_max"`` (a ``(lo, hi)`` pair: elementwise minimum of ``lo``, maximum of
        ``hi``) or ``"mean"`` (every leaf averaged), NaN values ignored in both (an untaken
        ``cond`` branch); the combination is emitted once, after the loop. ``None``
        (default): emitting inside a ``while_loop`` raises."""
        return None

    def pool_iterations(self, key: str, stacked: Any) -> Any | None:
        """One value for the values emitted under ``key`` by an op of a ``scan`` body that
        reads one weight in every iteration (a scan constant: ``fori_loop``, broadcast
        params), given stacked along a leading iteration axis; ``None`` keeps them stacked.
        Default: as :meth:`loop_reduction` pools a ``while_loop``'s."""
        how = self.loop_reduction(key)
        return None if how not in ("min_max", "mean") else loop_pooling.pool_iterations(how, stacked)

    def target(self, eqn, invals: list, emit: Callable[[str, Any], None]) -> list | None:
        return None

    def other(self, eqn, invals: list, emit: Callable[[str, Any], None]) -> list | None:
        """What another op that reads a weight (an elementwise ``add`` of a bias, say)
        becomes; ``None`` (default) binds it on :meth:`materialize`'d values. Not called
        for layout ops (they extend the ``WeightRef``) nor higher-order primitives."""
        return None

    def materialize(self, ref: WeightRef):
        """The value an op that is not a target reads from a weight (a gather of an
        embedding, an elementwise op, an output): the float weight by default; handlers
        that quantize override it, so such an op sees the value deployment stores."""
        return materialize(ref)

    def aux(self, path: str) -> Any:
        """An array to keep with the params leaf at ``path`` (``WeightRef.aux``), sliced
        with it by ``scan``s over a stacked leaf; ``None`` by default."""
        return None

    def acts_on(self, ref: WeightRef) -> bool:
        """Whether :meth:`target` may replace an op that reads ``ref``. A ``custom_jvp`` /
        ``custom_vjp`` call is inlined (its derivative rule replaced by the handler's) only
        when one of its targets reads such a weight; otherwise it is bound unchanged on
        :meth:`materialize`'d values. Default: ``True`` (every weight)."""
        return True

    def read(self, ref: WeightRef, where: str) -> None:
        """Called before :meth:`materialize` when something other than a target op reads
        ``ref``: ``where`` names it (a primitive, or ``"the function's output"``). Does
        nothing by default; handlers use it to report weights no target reads."""

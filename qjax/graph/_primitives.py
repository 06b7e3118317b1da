"""Version-stable reads of control-flow equation parameters.

jax 0.10 gives a ``scan`` equation ``num_consts`` and ``num_carry``; jax 0.11 replaced them
with ``ft_in``, a flat tree of (consts, carry, xs). Everything in :mod:`qjax.graph` that
splits a scan's operands asks :func:`scan_counts`.
"""

from __future__ import annotations


def scan_counts(params: dict) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a ``scan`` equation's ``params``, on jax 0.10 and 0.11."""
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].unpack()
    return len(list(consts)), len(list(carry))

"""The rule engine: paths, first-match, skip rules, unused rules, boxes, errors."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx
from hypothesis import given
from hypothesis import strategies as st

import qjax
from qjax.rules import RuleSet, leaves_with_paths, map_matched, map_with_path, path_str


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Block:
    w: jax.Array
    b: jax.Array


def test_path_parts_dict_attr_and_index():
    tree = {"params": {"layers": [Block(jnp.ones(2), jnp.zeros(1)), (jnp.ones(3),)]}}
    paths = [p for p, _ in leaves_with_paths(tree)]
    assert paths == ["params/layers/0/w", "params/layers/0/b", "params/layers/1/0"]


def test_nnx_variables_are_transparent():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(3, 4, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(4, 2, rngs=rngs)])

    _, state = nnx.split(M(nnx.Rngs(0)))
    paths = sorted(p for p, _ in leaves_with_paths(state))
    assert paths == ["a/bias", "a/kernel", "layers/0/bias", "layers/0/kernel"]


def test_linen_partitioned_is_transparent_and_kept():
    class D(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.ones, (None, "model"))
            return nn.Dense(4, kernel_init=init)(x)

    variables = D().init(jax.random.key(0), jnp.ones((1, 3)))
    assert [p for p, _ in leaves_with_paths(variables)] == ["params/Dense_0/bias", "params/Dense_0/kernel"]
    doubled = map_with_path(lambda p, x: x * 2, variables)
    box = doubled["params"]["Dense_0"]["kernel"]
    assert isinstance(box, nn.Partitioned) and box.names == (None, "model")
    assert jnp.all(box.value == 2)


def test_a_user_key_named_value_is_a_path_part():
    # Only boxes are transparent: a dict key "value" (e.g. attention's value projection) stays.
    tree = {"attention": {"value": {"kernel": jnp.ones((2, 2))}}}
    assert leaves_with_paths(tree)[0][0] == "attention/value/kernel"


def test_qarray_is_one_leaf():
    q = qjax.quantize(jnp.ones((4, 4)), qjax.QuantSpec(qjax.int8))
    assert leaves_with_paths({"w": q}) == [("w", q)]


def test_first_match_wins_and_none_skips():
    rules = RuleSet([(r".*/bias", None), (r"params/.*", "a"), (r".*kernel", "b")])
    assert rules.match("params/Dense_0/bias").value is None
    assert rules.match("params/Dense_0/kernel").value == "a"
    assert rules.match("other/kernel").value == "b"
    assert rules.match("other/thing") is None


def test_fullmatch_not_search():
    rules = RuleSet([(r"kernel", 1)])
    assert rules.match("params/kernel") is None
    assert rules.match("kernel").index == 0


def test_unused_reports_wrong_and_shadowed_patterns():
    tree = {"params": {"Dense_0": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}}}
    rules = RuleSet([(r".*", 1), (r".*/kernel", 2), (r"params/Dense_9/.*", 3)])
    assert rules.unused(tree) == [r".*/kernel", r"params/Dense_9/.*"]
    assert rules.unused(["params/Dense_9/kernel"]) == [r".*/kernel", r"params/Dense_9/.*"]
    assert RuleSet([(r"params/Dense_9/.*", 3)]).unused(["params/Dense_9/kernel"]) == []


def test_bad_patterns_are_clear_errors():
    with pytest.raises(ValueError, match=r"rule 1 pattern '\(unclosed' is not a valid regular expression"):
        RuleSet([("ok", 1), ("(unclosed", 2)])
    with pytest.raises(TypeError, match="rule 0 pattern must be a string"):
        RuleSet([(3, 1)])
    with pytest.raises(TypeError, match="rule 0 must be a"):
        RuleSet([("only-a-pattern",)])


def test_map_matched_touches_only_matched_leaves():
    tree = {"a": {"kernel": jnp.ones(2), "bias": jnp.ones(2)}, "b": jnp.ones(2)}
    rules = RuleSet([(r"a/bias", None), (r"a/.*", 10.0)])
    out = map_matched(lambda p, x, m: x * m.value, tree, rules)
    assert jnp.all(out["a"]["kernel"] == 10) and jnp.all(out["a"]["bias"] == 1) and jnp.all(out["b"] == 1)


@given(st.lists(st.text(alphabet="abcXYZ_019", min_size=1, max_size=6), min_size=1, max_size=5))
def test_path_roundtrip_through_nested_dicts(parts):
    tree = jnp.zeros(())
    for p in reversed(parts):
        tree = {p: tree}
    assert leaves_with_paths(tree)[0][0] == "/".join(parts)
    assert (
        RuleSet([("/".join(map(re.escape, parts)), 1)])
        .match(path_str([jax.tree_util.DictKey(p) for p in parts]))
        .value
        == 1
    )

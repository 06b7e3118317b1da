"""Policy: validation, lookup, unused rules, JSON round trip."""

import jax.numpy as jnp
import pytest

import qjax

INT8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
ACT = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN, calibration=qjax.calib.percentile(99.9))


def test_lookup_first_match_and_skip():
    policy = qjax.Policy(
        [
            qjax.Rule(r"params/.*embed.*", None),
            qjax.Rule(r"params/.*/kernel", weight=INT8, act=ACT),
            qjax.Rule(r"params/head/bias", act=ACT),
        ]
    )
    assert policy.weight_spec("params/embed/kernel") is None
    assert policy.act_spec("params/embed/kernel") is None
    assert policy.weight_spec("params/Dense_0/kernel") is INT8
    assert policy.act_spec("params/Dense_0/kernel") is ACT
    assert policy.weight_spec("params/head/bias") is None and policy.act_spec("params/head/bias") is ACT
    assert policy.match("params/Dense_0/bias") is None


def test_unused_rules_are_reported():
    params = {"params": {"Dense_0": {"kernel": jnp.ones((2, 2))}}}
    policy = qjax.Policy([qjax.Rule(r"params/Dens_0/kernel", weight=INT8), qjax.Rule(r".*", weight=INT8)])
    assert policy.unused(params) == ["params/Dens_0/kernel"]


def test_validation_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"'\[' is not a valid regular expression"):
        qjax.Rule("[", weight=INT8)
    with pytest.raises(TypeError, match=r"Rule 'w': weight must be a qjax\.QuantSpec"):
        qjax.Rule("w", weight="int8")
    with pytest.raises(ValueError, match="PER_TOKEN is for activations"):
        qjax.Rule("w", weight=qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN))
    with pytest.raises(TypeError, match=r"Policy entry 1 must be a qjax\.Rule"):
        qjax.Policy([qjax.Rule("a", None), ("b", INT8)])


def test_policy_is_immutable_and_hashable():
    policy = qjax.Policy([qjax.Rule("a", weight=INT8)])
    assert isinstance(policy.rules, tuple)
    with pytest.raises(AttributeError):
        policy.rules[0].weight = None
    assert hash(policy) == hash(qjax.Policy([qjax.Rule("a", weight=INT8)]))


def test_json_round_trip_every_field():
    policy = qjax.Policy(
        [
            qjax.Rule(r".*embed.*", None),
            qjax.Rule(
                r".*/kernel",
                weight=qjax.QuantSpec(
                    qjax.int4,
                    channel_axes=(-1,),
                    group_size=64,
                    group_axis=0,
                    calibration=qjax.calib.mse(32, 0.5),
                    pad_groups=True,
                    pack_axis=0,
                ),
                act=ACT,
            ),
            qjax.Rule(r".*/conv", weight=qjax.QuantSpec(qjax.uint8, symmetric=False, rounding="stochastic")),
            qjax.Rule(r".*/fp8", weight=qjax.QuantSpec(qjax.fp8_e4m3, calibration=qjax.calib.fixed(-2, 3))),
            qjax.Rule(r".*/lsq", weight=qjax.QuantSpec(qjax.int8.with_narrow(), ste="lsq")),
        ]
    )
    again = qjax.Policy.from_json(policy.to_json())
    assert again == policy
    assert again.rules[1].act.channel_axes is qjax.PER_TOKEN


def test_from_json_rejects_garbage():
    with pytest.raises(ValueError, match="not a qjax policy"):
        qjax.Policy.from_json("[1, 2]")
    with pytest.raises(ValueError, match="policy rule 0 is malformed"):
        qjax.Policy.from_json('{"rules": [{"pattern": "a", "weight": {"format": "int99"}}]}')
    with pytest.raises(ValueError, match="policy rule 0 is malformed"):
        qjax.Policy.from_json('{"rules": [{"pattern": "a", "weight": {"format": "int8", "bogus": 1}}]}')

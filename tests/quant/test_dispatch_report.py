"""``qjax.dispatch_report``: what each weight's op runs under ``qjax.quantized``, read back from
the ``qjax[path]`` named scopes that ``quantized`` puts around the ops."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
TOK8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
W4G = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_axis=0, group_size=64)
POLICY = qjax.Policy(
    [qjax.Rule(r".*Dense_0/kernel", weight=W8, act=TOK8), qjax.Rule(r".*Dense_1/kernel", weight=W4G)]
)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, scale: float = 1.0):
        x = nn.relu(nn.Dense(128)(x)) * scale
        x = nn.Dense(64)(x)
        return nn.Dense(32)(x)  # no rule: float


def _setup():
    x = jax.random.normal(jax.random.key(0), (16, 64)).astype(jnp.bfloat16)
    v = MLP().init(jax.random.key(1), x)
    return x, v, qjax.quantize_params(v, POLICY)


def test_xla_paths_on_cpu_name_the_integer_and_float_dots():
    x, v, qp = _setup()
    report = qjax.dispatch_report(MLP().apply, POLICY)(qp, x)
    by_path = {r.path: r for r in report}
    assert list(by_path) == [f"params/Dense_{i}/kernel" for i in range(3)]  # program order
    assert by_path["params/Dense_0/kernel"].runs == ("xla:dot_general int8xint8 -> int32",)
    assert by_path["params/Dense_0/kernel"].quantized and not by_path["params/Dense_0/kernel"].kernel
    assert by_path["params/Dense_1/kernel"].quantized
    assert not by_path["params/Dense_2/kernel"].quantized
    assert str(by_path["params/Dense_2/kernel"]).startswith("params/Dense_2/kernel (float): xla:dot_general")
    # float params quantized on the fly by the rules: the same ops
    assert [r.runs for r in qjax.dispatch_report(MLP().apply, POLICY)(v, x)] == [r.runs for r in report]


@pytest.mark.parametrize("backend", ["interpret-gpu", "interpret-tpu"])
def test_kernels_are_named_and_their_bodies_not_counted(backend):
    x, _, qp = _setup()
    report = {r.path: r for r in qjax.dispatch_report(MLP().apply, POLICY, backend=backend)(qp, x)}
    for path in ("params/Dense_0/kernel", "params/Dense_1/kernel"):
        assert report[path].kernel and all(r.startswith("pallas:") for r in report[path].runs), report[path]
    assert not report["params/Dense_2/kernel"].kernel
    stored = qjax.store_transposed(qp, r".*Dense_0/kernel")
    report = {r.path: r for r in qjax.dispatch_report(MLP().apply, POLICY, backend=backend)(stored, x)}
    assert report["params/Dense_0/kernel"].kernel


def test_static_kwargs_abstract_inputs_and_scan_stacks():
    x, _, qp = _setup()
    abstract = jax.eval_shape(lambda p: p, qp)
    report = qjax.dispatch_report(MLP().apply, POLICY)(
        abstract, jax.ShapeDtypeStruct(x.shape, x.dtype), scale=2.0
    )
    assert len(report) == 3

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h, _):
            return nn.Dense(16)(h), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)()(
                h, None
            )[0]

    h = jnp.ones((4, 16))
    pol = qjax.Policy(
        [qjax.Rule(".*kernel", weight=qjax.QuantSpec(qjax.int8, channel_axes=(0, -1)), act=TOK8)]
    )
    v = Stack().init(jax.random.key(0), h)
    (row,) = qjax.dispatch_report(Stack().apply, pol)(qjax.quantize_params(v, pol), h)
    assert row.path == "params/ScanBlock_0/Dense_0/kernel" and row.runs == (
        "xla:dot_general int8xint8 -> int32",
    )


def test_forced_kernel_that_cannot_run_raises_naming_the_leaf():
    x, v, _ = _setup()
    asym = qjax.Policy([qjax.Rule(r".*Dense_0/kernel", weight=qjax.QuantSpec(qjax.uint8, symmetric=False))])
    with pytest.raises(ValueError, match=r"leaf 'params/Dense_0/kernel'.*kernels take signed integer codes"):
        qjax.dispatch_report(MLP().apply, asym, backend="interpret-gpu")(qjax.quantize_params(v, asym), x)


def test_scopes_name_the_ops_in_the_compiled_program():
    x, _, qp = _setup()
    hlo = jax.jit(qjax.quantized(MLP().apply, POLICY)).lower(qp, x).as_text(debug_info=True)
    for i in range(3):
        assert f"qjax[params/Dense_{i}/kernel]" in hlo
    y = qjax.quantized(MLP().apply, POLICY)(qp, x)
    assert np.isfinite(np.asarray(y, np.float32)).all()

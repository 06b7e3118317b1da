"""make_mesh: axis names, deliberate axis types, -1, and errors that give the numbers."""

import jax
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from qjax import parallel as qp


def test_shapes_and_types():
    mesh = qp.make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {
        "data": 2,
        "fsdp": 2,
        "tensor": 2,
    }
    assert mesh.axis_types == (AxisType.Auto,) * 3 and not qp.is_explicit(mesh)
    explicit = qp.make_mesh(fsdp=-1, tensor=2, axis_types="explicit")
    assert dict(explicit.shape) == {"data": 1, "fsdp": 4, "tensor": 2} and qp.is_explicit(explicit)
    assert qp.make_mesh(data=8, axis_types=AxisType.Explicit).axis_types == (AxisType.Explicit,) * 3
    one = qp.make_mesh(devices=jax.devices()[:1])
    assert one.devices.size == 1
    s = qp.batch_sharding(mesh, 3)
    assert s.spec == P(("data", "fsdp"), None, None) and s.shard_shape((16, 4, 2)) == (4, 4, 2)
    sh = qp.batch_shardings(mesh, {"x": jax.numpy.zeros((8, 2)), "n": jax.numpy.zeros(())})
    assert sh["n"].spec == P() and sh["x"].spec == P(("data", "fsdp"), None)
    assert qp.batch_sharding(mesh, 2, "data").spec == P(("data",), None)  # one axis name


def test_batch_sharding_rejects_an_array_or_a_bad_ndim():
    mesh = qp.make_mesh(data=2, fsdp=2, tensor=2)
    with pytest.raises(TypeError, match=r"ndim must be .* got ArrayImpl; .* batch_shardings\(mesh, batch\)"):
        qp.batch_sharding(mesh, jax.numpy.ones((16, 4)))
    with pytest.raises(ValueError, match=r"ndim must be >= 1 .*, got 0"):
        qp.batch_sharding(mesh, 0)
    with pytest.raises(ValueError, match=r"mesh has no axis \['rows'\]"):
        qp.batch_sharding(mesh, 2, "rows")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(data=2, fsdp=2, tensor=4), r"data=2 × fsdp=2 × tensor=4 = 16 devices, but 8 are available"),
        (dict(data=3), r"= 3 devices, but 8"),
        (dict(data=0), r"data=0 must be a positive integer"),
        (dict(data=-1, fsdp=-1), r"only one axis may be -1"),
        (dict(data=3, fsdp=-1), r"8 devices cannot be split"),
        (dict(data=8, axis_types="manual"), r"axis_types must be 'auto', 'explicit'"),
    ],
)
def test_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qp.make_mesh(**kwargs)

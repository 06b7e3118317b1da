"""Hardware capability table: detection from device kinds and CPU flags, overrides,
native support of candidates, compute formats."""

import dataclasses

import pytest

import qjax
from qjax import autoprec

W8 = qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
A8 = qjax.QuantSpec(qjax.int8, channel_axes=qjax.PER_TOKEN)
W4 = qjax.QuantSpec(qjax.int4, channel_axes=(-1,))
F8 = qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=(-1,))
F8A = qjax.QuantSpec(qjax.fp8_e4m3, channel_axes=qjax.PER_TOKEN)
W8A8 = autoprec.Candidate("w8a8", weight=W8, act=A8)
W4A8 = autoprec.Candidate("w4a8", weight=W4, act=A8)
FP8 = autoprec.Candidate("fp8", weight=F8, act=F8A)
W4ONLY = autoprec.Candidate("int4", weight=W4)


@dataclasses.dataclass
class Dev:
    platform: str
    device_kind: str


@pytest.mark.parametrize(
    "platform,kind,name",
    [
        ("tpu", "TPU v5 lite", "tpu-v5e"),
        ("tpu", "TPU v5e", "tpu-v5e"),
        ("tpu", "TPU v5", "tpu-v5p"),
        ("tpu", "TPU v5p", "tpu-v5p"),
        ("tpu", "TPU v6 lite", "tpu-v6e"),
        ("tpu", "TPU7x", "tpu-v7x"),
        ("gpu", "NVIDIA H100 80GB HBM3", "nvidia-hopper"),
        ("gpu", "NVIDIA H200", "nvidia-hopper"),
        ("gpu", "NVIDIA A100-SXM4-40GB", "nvidia-ampere"),
        ("gpu", "NVIDIA L4", "nvidia-ada"),
        ("gpu", "NVIDIA B200", "nvidia-blackwell"),
    ],
)
def test_detect_from_device_kind(platform, kind, name):
    assert autoprec.detect_hardware(devices=[Dev(platform, kind)]).name == name


def test_detect_cpu_flags_unknown_and_override():
    cpu = [Dev("cpu", "cpu")]
    assert autoprec.detect_hardware(devices=cpu, cpuinfo="flags : fpu avx2 avx512_vnni").name == "cpu-int8"
    assert autoprec.detect_hardware(devices=cpu, cpuinfo="Features : fp asimd asimddp").name == "cpu-int8"
    assert autoprec.detect_hardware(devices=cpu, cpuinfo="flags : fpu sse4_2 avx2").name == "cpu"
    unknown = autoprec.detect_hardware(devices=[Dev("gpu", "Mystery GPU 9000")])
    assert unknown.name == "gpu-unknown" and not unknown.supports(W8A8) and unknown.supports(W4ONLY)
    assert autoprec.detect_hardware().platform == "cpu"  # the test machine
    assert autoprec.detect_hardware("tpu-v6e").name == "tpu-v6e"
    custom = autoprec.lookup("cpu").with_native(int8=3.0)
    assert autoprec.detect_hardware(custom) is custom and custom.speed("int8") == 3.0
    with pytest.raises(KeyError, match=r"known:.*tpu-v5e"):
        autoprec.detect_hardware("tpu-v99")
    with pytest.raises(TypeError, match="override"):
        autoprec.detect_hardware(3)


def test_native_support_and_speed():
    lk = autoprec.lookup
    assert not lk("cpu").supports(W8A8) and lk("cpu-int8").supports(W8A8)
    assert lk("nvidia-hopper").supports(FP8) and not lk("nvidia-ampere").supports(FP8)
    assert lk("tpu-v5e").supports(W8A8) and not lk("tpu-v5e").supports(FP8)
    assert lk("tpu-v7x").supports(FP8) and not lk("tpu-v7x").supports(W8A8)
    for hw in autoprec.HARDWARE.values():  # weight-only and float run everywhere (in the reference format)
        assert hw.supports(W4ONLY) and hw.supports(autoprec.FLOAT)
        assert hw.candidate_speed(W4ONLY) == hw.speed(hw.reference)
    assert lk("tpu-v5e").candidate_speed(W4A8) == 2.0
    assert lk("tpu-v7x").speed("int8") == lk("tpu-v7x").speed("bfloat16")  # emulated
    with pytest.raises(ValueError, match="reference 'float32' must be native"):
        lk("cpu-int8").with_native(float32=0)


def test_compute_format():
    assert W8A8.compute_format() == "int8" and W4A8.compute_format() == "int8"
    assert W4ONLY.compute_format("bfloat16") == "bfloat16"
    assert FP8.compute_format() == "fp8_e4m3"
    assert autoprec.Candidate("mixed", weight=F8, act=A8).compute_format() == "float32"
    assert autoprec.Candidate("act-only", act=A8).compute_format() == "float32"


def test_candidate_validation():
    with pytest.raises(TypeError, match="non-empty"):
        autoprec.Candidate("")
    with pytest.raises(TypeError, match="'x': weight"):
        autoprec.Candidate("x", weight="int8")
    with pytest.raises(ValueError, match=r"repeated.*int8"):
        autoprec.check_candidates([autoprec.Candidate("int8", weight=W8)] * 2)
    with pytest.raises(ValueError, match="bits 9"):
        autoprec.weight_candidates((9,))
    with pytest.raises(ValueError, match="empty"):
        autoprec.Hardware("x", "cpu", ())

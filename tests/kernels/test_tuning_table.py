"""The tuning table: lookup limits, the compute-capability guard, the speedup margin that
``backend="auto"`` needs, the shipped GPU table, and how the benchmark turns its
measurements into entries (against the XLA path dispatch would otherwise run)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import pytest

import qjax
from qjax.kernels import BlockConfig, api, dispatch, gpu_wgmma, tuning
from qjax.kernels.candidates import gpu_candidates, variant

CFG = BlockConfig(16, 64, 128, 2, True)


def _abstract_weight(shape, spec):
    """A quantized weight's shapes and dtypes only: dispatch plans from those (no 4096^2 or
    8192^2 quantization on the CPU)."""
    return jax.eval_shape(lambda: qjax.quantize(jnp.zeros(shape, jnp.float32), spec))


def _entry(m, k, n, kernel_us=10.0, xla_us=20.0, kernel="w8a16", config=CFG):
    return tuning.TunedEntry(kernel, m, k, n, None, config, kernel_us, xla_us)


def test_lookup_ignores_entries_measured_far_from_the_shape():
    entries = (_entry(16, 4096, 4096),)
    assert tuning.lookup("gpu", "w8a16", 8, 1024, 16384, None, entries) is not None  # factor 4: near
    assert tuning.lookup("gpu", "w8a16", 8, 1023, 4096, None, entries) is None  # K beyond a factor 4
    assert tuning.lookup("gpu", "w8a16", 8, 4096, 256, None, entries) is None  # N far off


def test_lookup_does_not_carry_a_speedup_down_to_a_much_smaller_weight():
    """A kernel's fixed costs weigh more on a smaller weight (H100: 2.4x bf16 at 8192^2, 1.9x
    at 4096^2), so an entry stands for a weight up to MAX_SHRINK times smaller, exclusive,
    but for any larger one within MAX_SHAPE_RATIO per axis."""
    entries = (_entry(16, 8192, 8192),)
    assert tuning.lookup("gpu", "w8a16", 8, 4096, 4096, None, entries) is None  # a quarter of it
    assert tuning.lookup("gpu", "w8a16", 8, 4096, 8192, None, entries) is None  # half: not less
    assert tuning.lookup("gpu", "w8a16", 8, 4097, 8192, None, entries) is not None
    assert tuning.lookup("gpu", "w8a16", 8, 5504, 8192, None, entries) is not None  # a LLaMA MLP's
    assert tuning.lookup("gpu", "w8a16", 8, 32768, 16384, None, entries) is not None  # larger
    # the nearer of two entries still wins where both qualify
    both = (*entries, _entry(16, 4096, 4096, config=BlockConfig(16, 128, 64, 4, True)))
    assert tuning.lookup("gpu", "w8a16", 8, 4096, 4096, None, both).k == 4096
    assert tuning.lookup("gpu", "w8a16", 8, 6000, 6000, None, both).k == 8192


def test_lookup_prefers_the_nearest_batch_within_a_bucket():
    entries = (_entry(1, 4096, 4096, 10.0), _entry(4, 4096, 4096, 20.0), _entry(16, 4096, 4096, 30.0))
    assert [tuning.lookup("gpu", "w8a16", m, 4096, 4096, None, entries).m for m in (1, 3, 5, 12, 16)] == [
        1,
        4,
        4,
        16,
        16,
    ]


def _write(tmp_path, cc):
    path = tmp_path / "tuning_gpu.json"
    tuning.write_table(path, "dev", "2026-11-26", [_entry(16, 4096, 4096)], compute_capability=cc)
    return path


@pytest.mark.parametrize(
    "table_cc,device_cc,applies",
    [("9.0", "9.0", True), ("9.0", "8.0", False), (None, "9.0", False), ("9.0", None, True)],
)
def test_a_gpu_table_applies_only_to_its_compute_capability(
    tmp_path, monkeypatch, table_cc, device_cc, applies
):
    path = _write(tmp_path, table_cc)
    monkeypatch.setattr(tuning, "table_path", lambda platform: path)
    monkeypatch.setattr(tuning, "gpu_compute_capability", lambda: device_cc)  # None: not on a GPU
    assert bool(tuning.load_table.__wrapped__("gpu")) == applies
    assert tuning.table_compute_capability(path) == table_cc


def test_batch_ties_go_to_the_larger_measured_batch_whatever_the_order():
    entries = (_entry(16, 4096, 4096, 30.0), _entry(4, 4096, 4096, 20.0))  # M = 8: both log 2 away
    assert tuning.lookup("gpu", "w8a16", 8, 4096, 4096, None, entries).m == 16
    assert tuning.lookup("gpu", "w8a16", 8, 4096, 4096, None, entries[::-1]).m == 16


def test_engines_tied_on_batch_go_to_the_larger_measured_batch(monkeypatch):
    """M = 2 between a gemv entry measured at one row (the larger speedup) and a tensor-core
    one at four: the tensor-core one, measured at the more demanding batch."""
    gemv = BlockConfig(1, 128, 128, 8, False, 4, 3, engine="gemv")
    tc = BlockConfig(16, 256, 64, 8, dequant="ptx")
    entries = (
        _entry(1, 4096, 4096, 10.0, 15.0, kernel="w4a16_n_pairs_gemv", config=gemv),
        _entry(4, 4096, 4096, 10.0, 11.5, kernel="w4a16_n_pairs", config=tc),
    )
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    assert api.tuned_entry("gpu", "w4a16", 2, 4096, 4096, None, "n_pairs").config == tc
    assert api.tuned_entry("gpu", "w4a16", 1, 4096, 4096, None, "n_pairs").config == gemv


def test_engines_measured_at_the_same_shape_go_to_the_shorter_kernel_time(monkeypatch):
    """Each engine's speedup divides by its own timing of the same XLA op, so at one shape the
    kernel times decide (a noisy baseline must not pick the slower kernel); entries at
    different shapes, equally near, compare by speedup."""
    gemv = BlockConfig(1, 128, 128, 8, False, 4, 3, engine="gemv")
    tc = BlockConfig(16, 256, 64, 8, dequant="ptx")
    fast = _entry(1, 4096, 4096, 10.0, 15.0, kernel="w4a16_n_pairs", config=tc)  # 1.5x
    slow = _entry(1, 4096, 4096, 12.0, 24.0, kernel="w4a16_n_pairs_gemv", config=gemv)  # 2.0x
    for entries in ((fast, slow), (slow, fast)):
        monkeypatch.setattr(tuning, "load_table", lambda platform, e=entries: e)
        assert api.tuned_entry("gpu", "w4a16", 1, 4096, 4096, None, "n_pairs").config == tc
    # K = N = 4096 between entries at 2048 x 4096 and 4096 x 2048 (both a factor 2 away): the
    # larger speedup, whichever kernel time is shorter
    short_k = _entry(1, 2048, 4096, 3.0, 4.5, kernel="w4a16_n_pairs", config=tc)  # 1.5x
    short_n = _entry(1, 4096, 2048, 4.0, 8.0, kernel="w4a16_n_pairs_gemv", config=gemv)  # 2.0x
    monkeypatch.setattr(tuning, "load_table", lambda platform: (short_k, short_n))
    assert api.tuned_entry("gpu", "w4a16", 1, 4096, 4096, None, "n_pairs").config == gemv


def test_kernel_times_from_two_devices_tables_do_not_compare():
    """A model's table merges with the shared one: at one shape, an entry measured on another
    device competes by speedup, not by its kernel time."""
    tc = BlockConfig(16, 256, 64, 8, dequant="ptx")
    wg = BlockConfig(8, 256, 128, 8, True, engine="wgmma")
    here = dataclasses.replace(_entry(1, 4096, 4096, 120.0, 300.0, "w4a16_n_pairs_nk", tc), source="own.json")
    there = dataclasses.replace(
        _entry(1, 4096, 4096, 95.0, 100.0, "w4a16_n_pairs_nk_wgmma", wg), source="cc.json"
    )
    assert tuning.preferred([there, here], 1, 4096, 4096) is here
    same = dataclasses.replace(there, source="own.json")
    assert tuning.preferred([same, here], 1, 4096, 4096) is same


def test_device_table_path_names_the_model():
    path = tuning.device_table_path("gpu", "NVIDIA H100 80GB HBM3")
    assert (
        path.name == "tuning_gpu_nvidia_h100_80gb_hbm3.json"
        and path.parent == tuning.table_path("gpu").parent
    )
    assert tuning.device_table_path("gpu", " A100-SXM4 (40GB) ").name == "tuning_gpu_a100_sxm4_40gb.json"


def _two_tables(tmp_path, monkeypatch, kind, own_device="GPU X", own_cc="9.0"):
    """A compute-capability table (w8a16 at bucket 16 and 64, w8a8) and a model table
    (w8a16 at bucket 16 only, another config) in tmp_path, on a device of model ``kind``."""
    shared, own = tmp_path / "tuning_gpu.json", tmp_path / "tuning_gpu_gpu_x.json"
    other = BlockConfig(16, 128, 64, 4)
    tuning.write_table(
        shared,
        "GPU Y",
        "2026-11-26",
        [_entry(1, 4096, 4096), _entry(64, 4096, 4096), _entry(16, 4096, 4096, kernel="w8a8")],
        compute_capability="9.0",
    )
    tuning.write_table(own, own_device, "2026-11-27", [_entry(4, 8192, 8192, config=other)], own_cc)
    monkeypatch.setattr(tuning, "table_path", lambda platform: shared)
    monkeypatch.setattr(
        tuning, "device_table_path", lambda platform, kind: tmp_path / "tuning_gpu_gpu_x.json"
    )
    monkeypatch.setattr(tuning, "gpu_compute_capability", lambda: None if kind is None else "9.0")
    monkeypatch.setattr(tuning, "gpu_device_kind", lambda: kind)
    return other


def test_a_model_table_replaces_what_it_measured(tmp_path, monkeypatch):
    other = _two_tables(tmp_path, monkeypatch, "GPU X")
    entries = tuning.load_table.__wrapped__("gpu")
    got = {(e.kernel, tuning.m_bucket(e.m)): e for e in entries}
    # w8a16 at bucket 16: the model's own entry only; the other kernels and buckets: shared
    assert sorted(got) == [("w8a16", 16), ("w8a16", 64), ("w8a8", 16)] and len(entries) == 3
    assert got["w8a16", 16].config == other and got["w8a16", 16].k == 8192
    assert tuning.lookup("gpu", "w8a16", 1, 6144, 8192, None, entries).config == other
    # the shared 4096^2 entry of that bucket is replaced, and the model's 8192^2 one does not
    # stand for a weight a quarter its size (MAX_SHRINK): XLA there
    assert tuning.lookup("gpu", "w8a16", 1, 4096, 4096, None, entries) is None
    assert tuning.lookup("gpu", "w8a16", 64, 4096, 4096, None, entries).config == CFG


@pytest.mark.parametrize(
    "kind,own_device,own_cc",
    [
        ("GPU Z", "GPU X", "9.0"),  # another model: its table is not read
        (None, "GPU X", "9.0"),  # not on a GPU (the interpreter): the shared table as defaults
        ("GPU X", "GPU-X", "9.0"),  # a file whose recorded device differs (names that reduce alike)
        ("GPU X", "GPU X", "8.0"),  # measured on another compute capability
    ],
)
def test_a_model_table_applies_only_to_its_model(tmp_path, monkeypatch, kind, own_device, own_cc):
    _two_tables(tmp_path, monkeypatch, kind, own_device, own_cc)
    if kind == "GPU Z":  # no file of its own
        monkeypatch.setattr(tuning, "device_table_path", lambda platform, kind: tmp_path / "missing.json")
    entries = tuning.load_table.__wrapped__("gpu")
    assert [e.config for e in entries] == [CFG] * 3 and all(e.k == 4096 for e in entries)


@pytest.mark.parametrize("speedup,taken", [(1.02, False), (tuning.MIN_SPEEDUP, True), (1.5, True)])
def test_auto_needs_the_margin(monkeypatch, speedup, taken):
    entries = (_entry(16, 64, 32, 10.0, 10.0 * speedup, config=BlockConfig(16, 32, 64)),)  # fits N=32
    monkeypatch.setattr(tuning, "load_table", lambda platform: entries)
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    w = qjax.quantize(
        jax.random.normal(jax.random.key(0), (64, 32)), qjax.QuantSpec(qjax.int8, channel_axes=(-1,))
    )
    plan, why = dispatch.plan(
        jnp.ones((4, 64), jnp.bfloat16), w, (((1,), (0,)), ((), ())), None, None, None, "auto"
    )
    assert (plan is not None) == taken, why


@pytest.mark.parametrize(
    "path", [tuning.table_path("gpu"), tuning.device_table_path("gpu", "NVIDIA H100 80GB HBM3")], ids=str
)
def test_shipped_gpu_tables_hold_legal_candidate_configs(path):
    entries = tuning.read_table(path)
    assert entries and tuning.table_compute_capability(path) == "9.0"
    wgmma_configs = set(gpu_wgmma.CONFIGS)
    for e in entries:
        kind, layout = _kind_layout(e.kernel)
        api.check_config_gpu(e.config, kind, e.m, e.k, e.n, e.group_size, layout)
        cands = (
            wgmma_configs
            if e.config.engine == "wgmma"
            else gpu_candidates(kind, e.m, e.k, e.n, e.group_size, layout)
        )
        # the H100 table was tuned (2026-11-27) while the in-kernel split-K sum was a candidate at
        # every small batch; the lists keep it at one row only since: its tile must be a candidate
        assert dataclasses.replace(e.config, split_reduce="xla") in cands or e.config in cands, e
        assert e.kernel_us > 0 and e.xla_us > 0
    if path != tuning.table_path("gpu"):  # a model's table names its model
        device = json.loads(path.read_text())["device"]
        assert tuning.device_table_path("gpu", device) == path


def _kind_layout(kernel):
    base = kernel.removesuffix("_wgmma").removesuffix("_gemv")
    if base.startswith("w4a16_"):
        return "w4a16", base.removeprefix("w4a16_")
    # the stored (N, K) weight runs the (N, K) kernel
    return {
        "w8a8": ("w8a8", "kn"),
        "w8a8_nk": ("w8a8", "nk"),
        "w8a8_nk_stored": ("w8a8", "nk"),
        "w8a16": ("w8a16", "int8"),
    }[base]


def _case(kernel, layout, m, group, config=CFG, **times):
    """A benchmark case record as ``bench_kernels`` writes it (K = N = 4096)."""
    cfg = None if config is None else config.to_dict()
    return dict(kernel=kernel, layout=layout, m=m, k=4096, n=4096, group_size=group, config=cfg, **times)


def test_table_entries_compare_with_the_fallback_dispatch_would_run(bench, tmp_path):
    cases = [
        # W8A8: XLA's int8 dot on the stored (K, N) codes, not the faster (N, K) one nor bf16
        _case(
            "w8a8",
            "nk",
            4096,
            None,
            kernel_us=170.0,
            xla_bf16_us=200.0,
            xla_int8_kn_us=260.0,
            xla_int8_nk_us=140.0,
        ),
        # weight-only: XLA's dequantize-and-dot, not the bf16 dot
        _case("w4a16", "n_pairs", 1, 128, kernel_us=20.0, xla_bf16_us=15.0, xla_quant_us=40.0),
        _case("w8a16", "int8", 1, None, config=None),  # no config: no entry
        _case(
            "w8a16", "int8", 1, None, kernel_us=20.0, xla_bf16_us=15.0, xla_quant_us=None
        ),  # fallback untimed
    ]
    nk, w4 = bench.table_entries(cases)
    assert (nk.kernel, nk.xla_us) == ("w8a8_nk", 260.0) and (w4.kernel, w4.speedup) == ("w4a16_n_pairs", 2.0)
    reports = []
    for i, cc in enumerate(("9.0", None)):
        reports.append(tmp_path / f"r{i}.json")
        reports[-1].write_text(
            json.dumps(
                {"device": "H", "date": f"2026-11-2{i}", "compute_capability": cc, "cases": cases[i : i + 1]}
            )
        )
    table = tmp_path / "t.json"
    bench.table_from_reports([str(r) for r in reports], table, compute_capability="9.0")
    assert tuning.table_compute_capability(table) == "9.0" and len(tuning.read_table(table)) == 2
    with pytest.raises(SystemExit, match="more than one device"):
        bench.table_from_reports([str(r) for r in reports], table, compute_capability="8.0")


@pytest.mark.parametrize(
    "m,group,expected",
    [
        (4, 128, "w4a16"),  # measured 1.7x over XLA's int4 path on the H200
        (4, None, None),  # measured slower than XLA's own int4 dot there
        (1, None, "w4a16"),
    ],
)
def test_shipped_table_drives_auto_on_a_hopper(monkeypatch, m, group, expected):
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    monkeypatch.setattr(tuning, "gpu_compute_capability", lambda: "9.0")
    monkeypatch.setattr(tuning, "gpu_device_kind", lambda: "NVIDIA H200")  # the shared table's model
    monkeypatch.setattr(tuning, "load_table", tuning.load_table.__wrapped__)  # uncached
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(-1,), group_size=group, group_axis=0 if group else None)
    w = _abstract_weight((4096, 4096), spec)
    x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    plan, why = dispatch.plan(x, w, (((1,), (0,)), ((), ())), None, None, None, "auto")
    assert (plan and plan.kind) == expected, why
    assert plan is None or plan.layout == "n_pairs"  # qjax.quantize packs int4 along N
    monkeypatch.setattr(tuning, "gpu_compute_capability", lambda: "8.0")  # an A100: no table
    plan, why = dispatch.plan(x, w, (((1,), (0,)), ((), ())), None, None, None, "auto")
    assert plan is None and "no measured speedup" in why


def test_the_h100_table_drives_auto_on_an_h100(monkeypatch):
    """W4A16 per channel at M = 4, 4096^2: the H200 table measured its kernel slower than XLA's
    int4 dot there (23.5 vs 19.3 us), the H100's own table the inline-PTX tile faster (16.9 vs
    19.5 us): on an H100 "auto" takes that tile, on an H200 it keeps XLA."""
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    monkeypatch.setattr(tuning, "gpu_compute_capability", lambda: "9.0")
    monkeypatch.setattr(tuning, "load_table", tuning.load_table.__wrapped__)  # uncached
    w = _abstract_weight((4096, 4096), qjax.QuantSpec(qjax.int4, (-1,)))
    x = jax.ShapeDtypeStruct((4, 4096), jnp.bfloat16)
    args = (x, w, (((1,), (0,)), ((), ())), None, None, None, "auto")
    monkeypatch.setattr(tuning, "gpu_device_kind", lambda: "NVIDIA H100 80GB HBM3")
    plan, why = dispatch.plan(*args)
    assert plan is not None and plan.kind == "w4a16" and plan.config.dequant == "ptx", why
    monkeypatch.setattr(tuning, "gpu_device_kind", lambda: "NVIDIA H200")
    plan, why = dispatch.plan(*args)
    assert plan is None and "no measured speedup" in why


@pytest.mark.parametrize(
    "m,size,taken",
    [(1, 8192, True), (16, 8192, True), (4, 8192, False), (1, 4096, True), (4, 4096, True), (16, 4096, True)],
)
def test_the_h100_table_takes_the_nk_tile_where_it_measured_it_faster(m, size, taken, monkeypatch):
    """int4 per channel stored (N, K) packed along N (``qjax.store_transposed``'s layout), on
    an H100 (2026-11-27, eighteenth session): at 8192^2 the inline-PTX tile beat XLA's int4 path
    at M = 1 and 16 (25.2 vs 41.6 and 28.8 vs 36.1 us wall) and tied it at M = 4 (27.2 vs 26.9);
    at 4096^2 (twenty-first session) it beat it at M = 1, 4 and 16 (13.0 vs 22.7, 13.3 vs 18.1
    and 15.8 vs 19.8 us wall)."""
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    monkeypatch.setattr(tuning, "gpu_compute_capability", lambda: "9.0")
    monkeypatch.setattr(tuning, "load_table", tuning.load_table.__wrapped__)  # uncached
    monkeypatch.setattr(tuning, "gpu_device_kind", lambda: "NVIDIA H100 80GB HBM3")
    spec = qjax.QuantSpec(qjax.int4, channel_axes=(0,), pack_axis=0)
    w = _abstract_weight((size, size), spec)
    x = jax.ShapeDtypeStruct((m, size), jnp.bfloat16)
    plan, why = dispatch.plan(x, w, (((1,), (1,)), ((), ())), None, None, None, "auto")
    assert (plan is not None) == taken, why
    if taken:
        assert (plan.kind, plan.layout, plan.config.dequant) == ("w4a16", "n_pairs_nk", "ptx")
    else:
        assert "no measured speedup" in why, why


def test_markdown_tables_of_saved_reports(bench):
    w8 = _case("w8a8", "nk", 4096, None, kernel_us=170.0, kernel_only_us=150.0, engine="wgmma")
    w8.update(m=4096, device_kernel_us=120.0, device_kernel_only_us=108.5, device_xla_bf16_us=163.0)
    w8.update(device_xla_int8_kn_us=222.0, device_xla_int8_nk_us=None)  # a baseline that did not run
    w4 = _case("w4a16", "n_pairs", 1, 128, kernel_us=20.0, xla_bf16_us=15.0, xla_quant_us=40.0)
    report = {"device": "H", "date": "2026-11-26", "jax": "0.11.2", "cases": [w8, w4, {"error": "x"}]}
    text = bench.markdown([report])
    assert "| wgmma | (N, K) stored | 4096 |" in text
    assert "| 108.5 | 1267 | 1.50× | 2.05× | — | 163.0 / 222.0 / — |" in text
    row = "| w4a16 | n_pairs | 1 | 4096 | 128 | triton 16×64×128 s2 w4 swap | — / — / — | — | — "
    row += "| 20.0 / 15.0 / 40.0 | — |"
    assert row in text  # device times missing (no CUPTI): dashes, never a crash


def test_later_small_batches_retime_each_engines_winners_first(bench):
    gemv = BlockConfig(1, 128, 32, 8, False, 8, 3, engine="gemv")
    gemv_wide = BlockConfig(1, 128, 128, 8, False, 8, 3, engine="gemv")  # no room at batch 4
    mma = BlockConfig(16, 64, 256, 4, True, 4, 4)
    tried = [
        {"config": c.to_dict(), "us": us}
        for c, us in [(mma, 12.0), (gemv_wide, 9.0), (gemv, 10.0), (BlockConfig(16, 128, 128, 8, True), 30.0)]
    ]
    cands = gpu_candidates("w4a16", 4, 4096, 4096, None, "n_pairs")
    order = bench.small_batch_candidates(tried, cands, 4, "n_pairs", per_engine=1)
    assert order[:2] == [mma, dataclasses.replace(gemv, block_m=4)]  # above one row gemv trails
    assert sorted(map(repr, order)) == sorted(map(repr, cands)) and len(order) == len(set(order))


def test_capped_candidates_take_each_variant_in_turn(bench):
    cands = gpu_candidates("w4a16", 1, 4096, 4096, None, "n_pairs")
    capped = bench.cap_per_engine(cands, 2)
    # the measured order at one row (H100, 2026-11-26), the in-kernel split-K sum (2026-11-27)
    order = ["gemv", "triton+ptx", "triton+ptx+ksum", "triton"]
    assert [variant(c) for c in capped] == order * 2
    assert capped[: len(order)] == [next(c for c in cands if variant(c) == v) for v in order]
    everything = bench.cap_per_engine(cands, None)  # uncapped: every config once, still in turns
    assert sorted(map(repr, everything)) == sorted(map(repr, cands))
    assert [variant(c) for c in everything[: len(order)]] == order
    # above one row the tensor-core tiles lead and gemv trails
    four = bench.cap_per_engine(gpu_candidates("w4a16", 4, 4096, 4096, None, "n_pairs"), 1)
    assert [variant(c) for c in four] == ["triton+ptx", "triton", "gemv"]


def test_a_transposed_w8a8_case_also_gives_the_stored_nk_entry(bench):
    case = _case(
        "w8a8",
        "nk",
        4096,
        None,
        kernel_us=175.0,
        kernel_only_us=160.0,
        xla_bf16_us=200.0,
        xla_int8_kn_us=260.0,
        xla_int8_nk_us=140.0,
    )
    nk, stored = bench.table_entries([case])
    assert (nk.kernel, nk.kernel_us, nk.xla_us) == ("w8a8_nk", 175.0, 260.0)
    # the weight stored (N, K): no transpose, and XLA's fallback reads the same (N, K) codes
    assert (stored.kernel, stored.kernel_us, stored.xla_us) == ("w8a8_nk_stored", 160.0, 140.0)
    wg = bench.table_entries([{**case, "config": dataclasses.replace(CFG, engine="wgmma").to_dict()}])
    assert [e.kernel for e in wg] == ["w8a8_nk_wgmma", "w8a8_nk_stored_wgmma"]


@pytest.mark.parametrize("stored_nk", [False, True])
def test_the_h100_table_takes_the_wgmma_w8a8_kernel_at_4096_cubed(stored_nk, monkeypatch):
    """W8A8 at 4096^3 on an H100 (2026-11-27, twenty-first session): the persistent Hopper
    ``wgmma`` kernel ran 126.7 us wall on a ``(K, N)`` weight (transposed in the program) and
    106.9 us on one stored ``(N, K)``, against XLA's int8 dot at 395.7 and 156.1 us (and the
    Triton kernel at 146.7 / 154.9 us): "auto" takes the wgmma entry for both weights."""
    monkeypatch.setattr(dispatch.api, "resolve_platform", lambda *a: "gpu")
    monkeypatch.setattr(tuning, "gpu_compute_capability", lambda: "9.0")
    monkeypatch.setattr(tuning, "load_table", tuning.load_table.__wrapped__)  # uncached
    monkeypatch.setattr(tuning, "gpu_device_kind", lambda: "NVIDIA H100 80GB HBM3")
    axis = 0 if stored_nk else 1
    spec = qjax.QuantSpec(qjax.int8, channel_axes=(axis,))
    w = _abstract_weight((4096, 4096), spec)
    x = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
    tokens = qjax.QuantSpec(qjax.int8, channel_axes=(0,))
    dn = (((1,), (1 if stored_nk else 0,)), ((), ()))
    plan, why = dispatch.plan(x, w, dn, tokens, None, None, "auto")
    assert plan is not None, why
    assert (plan.kind, plan.layout, plan.config.engine) == (
        "w8a8",
        "nk_stored" if stored_nk else "nk",
        "wgmma",
    )
    assert plan.config.persistent and (plan.config.block_m, plan.config.block_n) == (128, 256)

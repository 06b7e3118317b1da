"""What the kernel benchmark's reports become: tuning-table entries (each kernel time
next to the XLA path ``qjax.quantized`` would otherwise run), merged into the table on
disk or rebuilt from saved reports, and Markdown tables for BUILD_NOTES."""

from __future__ import annotations

import json
from pathlib import Path

from qjax.kernels import BlockConfig, tuning
from qjax.kernels.candidates import variant


def fallback_us(case: dict) -> float | None:
    """The time of the XLA formulation ``qjax.quantized`` runs when it does not take the
    kernel, on the same stored weight: XLA's int8 dot on the ``(K, N)`` codes for W8A8
    (every W8A8 kernel entry, the transposing ``(N, K)`` ones included, replaces it), XLA's
    dequantize-and-dot for weight-only. Not the bfloat16 dot: that needs a float weight the
    quantized model no longer has (the speed goals compare against it; dispatch cannot)."""
    return case.get("xla_int8_kn_us") if case["kernel"] == "w8a8" else case.get("xla_quant_us")


def table_entries(cases) -> list[tuning.TunedEntry]:
    """Tuning-table entries for the cases that found a config and timed their fallback: the
    best config and its time next to the fallback's (:func:`fallback_us`), both wall clock
    per call in the same run. A W8A8 ``(N, K)`` case also gives the entry for a weight
    *stored* ``(N, K)`` (``"w8a8_nk_stored"``): the kernel without the transpose
    (``kernel_only_us``) against XLA's int8 dot on that stored weight (``xla_int8_nk_us``)."""

    def entry(r, layout, kernel_us, xla_us):
        return tuning.TunedEntry(
            kernel=tuning.kernel_name(r["kernel"], layout, r["config"].get("engine", "triton")),
            m=r["m"],
            k=r["k"],
            n=r["n"],
            group_size=r["group_size"],
            config=BlockConfig.from_dict(r["config"]),
            kernel_us=kernel_us,
            xla_us=xla_us,
        )

    out = []
    for r in cases:
        if not r.get("config"):
            continue
        if fallback_us(r):
            out.append(entry(r, r["layout"], r["kernel_us"], fallback_us(r)))
        if (
            r["kernel"] == "w8a8"
            and r["layout"] == "nk"
            and r.get("kernel_only_us")
            and r.get("xla_int8_nk_us")
        ):
            out.append(entry(r, "nk_stored", r["kernel_only_us"], r["xla_int8_nk_us"]))
    return out


def merge_table(
    path: Path, device: str, date: str, new: list[tuning.TunedEntry], compute_capability: str | None
) -> None:
    """Write ``new`` into the table at ``path``, keeping the entries it holds for other
    kernels / shapes (so separate runs, e.g. ``--part wgmma``, add up)."""
    key = lambda e: (e.kernel, e.m, e.k, e.n, e.group_size)
    old = tuning.read_table(path) if path.exists() else ()
    fresh = {key(e) for e in new}
    entries = [e for e in old if key(e) not in fresh] + list(new)
    tuning.write_table(path, device, date, entries, compute_capability)


def table_from_reports(paths: list[str], table: Path, compute_capability: str | None = None) -> None:
    """Rebuild a tuning table from saved benchmark JSONs (later reports win per shape);
    every report must come from one device. ``compute_capability`` fills in reports that do
    not record it (runs before 2026-11-26 07:30 UTC)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    devices = {(r["device"], r.get("compute_capability") or compute_capability) for r in reports}
    if len(devices) != 1:
        raise SystemExit(f"--table-from: reports from more than one device: {sorted(devices, key=str)}")
    (device, cc), date = devices.pop(), max(r["date"] for r in reports)
    if cc is None:
        raise SystemExit("--table-from: the reports do not record the GPU's compute capability")
    for r in reports:
        merge_table(table, device, date, table_entries(r["cases"]), cc)


def _f(v, spec=".1f", unit=""):
    return "—" if v is None else f"{v:{spec}}{unit}"


def markdown(reports: list[dict]) -> str:
    """Markdown tables of saved reports (one device): W8A8 rows (the ``(N, K)`` cases also
    as the kernel alone) and weight-only rows, device and wall time, ratios to XLA."""
    head = reports[0]
    out = [
        f"# Kernels on {head['device']}, {head['date']} (jax {head['jax']}, `experiments/bench_kernels.py`)",
        "",
        f"Copy bandwidth probe: {_f(head.get('copy_bandwidth_GBps'), '.0f')} GB/s. Device time: CUPTI, "
        "per call. Wall: per call in a program of >= 96 calls. `vs quant`: XLA's formulation on "
        'the same stored weight (what `backend="xla"` runs).',
        "",
        "## W8A8",
        "",
        "| kernel | weight | M=K=N | config | device µs | TOP/s | vs bf16 | vs XLA int8 (K,N) "
        "| vs XLA int8 (N,K) | XLA device µs bf16 / int8 (K,N) / (N,K) | wall µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cases = [c for r in reports for c in r["cases"] if c.get("config")]
    for c in (c for c in cases if c["kernel"] == "w8a8"):
        cf = c["config"]
        cfg = f"{cf['block_m']}×{cf['block_n']}×{cf['block_k']} w{cf['num_warps']} s{cf['num_stages']}"
        cfg += " persistent" * bool(cf.get("persistent"))
        rows = [("(K, N)" if c["layout"] == "kn" else "(K, N) transposed per call", "kernel")]
        rows += [("(N, K) stored", "kernel_only")] if c["layout"] == "nk" else []
        for label, key in rows:
            d = c.get(f"device_{key}_us")
            tops = None if d is None else 2 * c["m"] * c["k"] * c["n"] / (d * 1e-6) / 1e12
            bases = [c.get(f"device_xla_{b}_us") for b in ("bf16", "int8_kn", "int8_nk")]
            ratios = [_f(None if d is None or b is None else b / d, ".2f", "×") for b in bases]
            out.append(
                f"| {c['engine']} | {label} | {c['m']} | {cfg} | {_f(d)} | {_f(tops, '.0f')} "
                f"| {' | '.join(ratios)} | {' / '.join(_f(b) for b in bases)} | {_f(c.get(f'{key}_us'))} |"
            )
    out += [
        "",
        "## Weight-only",
        "",
        "| kernel | layout | M | K=N | group | config: engine bm×bn×bk split warps "
        "| device µs kernel / bf16 / quant | vs bf16 | vs quant | wall µs kernel / bf16 / quant "
        "| HBM roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in (c for c in cases if c["kernel"] != "w8a8"):
        cf = c["config"]
        dev = " / ".join(_f(c.get(f"device_{k}_us")) for k in ("kernel", "xla_bf16", "xla_quant"))
        wall = " / ".join(_f(c.get(f"{k}_us")) for k in ("kernel", "xla_bf16", "xla_quant"))
        out.append(
            f"| {c['kernel']} | {c['layout']} | {c['m']} | {c['k']} | {c['group_size'] or '—'} "
            f"| {variant(BlockConfig.from_dict(cf))} {cf['block_m']}×{cf['block_n']}×{cf['block_k']} "
            f"s{cf['split_k']} w{cf['num_warps']}{' swap' * bool(cf.get('swap'))} | {dev} "
            f"| {_f(c.get('device_speedup_vs_xla_bf16'), '.2f', '×')} "
            f"| {_f(c.get('device_speedup_vs_xla_quant'), '.2f', '×')} | {wall} "
            f"| {_f(c.get('roofline_fraction'), '.2f')} |"
        )
    return "\n".join(out) + "\n"

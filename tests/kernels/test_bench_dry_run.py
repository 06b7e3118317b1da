"""``experiments/bench_kernels.py --dry-run``: the GPU path of the kernel benchmark runs end
to end on a CPU (kernels interpreted), so a script error surfaces here and not in a
scarce GPU session."""

import json
from pathlib import Path

from qjax.kernels.candidates import gpu_candidates

ROOT = Path(__file__).resolve().parents[2]


def test_main_part_runs_and_writes_a_table(bench, tmp_path):
    out, table = tmp_path / "bench.json", tmp_path / "tuning_gpu.json"
    args = ["--dry-run", "--part", "main", "--sizes", "256", "--batches", "1,4", "--layouts", "n_pairs"]
    args += ["--w8a8-size", "256", "--budget-s", "1", "--out", str(out), "--write-table", str(table)]
    bench.main(args)
    report = json.loads(out.read_text())
    assert report["device"].startswith("dry run") and report["checks"]
    assert all(c["ok"] for c in report["checks"]), [c for c in report["checks"] if not c["ok"]]
    cases = report["cases"]
    firsts = [(c["kernel"], c["layout"], c.get("m")) for c in cases][:2]
    assert firsts == [("w8a8", "kn", 256), ("w8a8", "nk", 256)]  # the goal cases run first
    assert not [c for c in cases if "error" in c], [c["error"] for c in cases if "error" in c]
    # batch 4 first re-times batch 1's fastest configs (gemv ones with block_m set to 4, if they fit)
    small = {c["m"]: c for c in cases if c["kernel"] == "w4a16" and c["group_size"] is None}
    assert small[1]["config"]["engine"] == "gemv"
    cands4 = gpu_candidates("w4a16", 4, 256, 256, None, "n_pairs")
    first = bench.small_batch_candidates(small[1]["tried"], cands4, 4, "n_pairs")[0]
    assert small[4]["tried"][0]["config"] == first.to_dict()
    # one entry per case (two for W8A8 (N, K)), named by the engine of the config that won
    # (interpreted timings decide which: the names follow the report, not a fixed set)
    entries = json.loads(table.read_text())["entries"]
    w4 = [c for c in cases if c["kernel"] == "w4a16"]
    want = {"w8a8", "w8a8_nk", "w8a8_nk_stored"}
    want |= {"w4a16_n_pairs" + ("_gemv" if c["config"]["engine"] == "gemv" else "") for c in w4}
    assert {e["kernel"] for e in entries} == want and len(entries) == 3 + len(w4)

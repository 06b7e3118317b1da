"""``qjax bench``: selection, skipping, running scripts in their own process, the summary,
and the one-line errors. Uses a stand-in experiments folder so the test does not run (or
overwrite the results of) the real benchmarks."""

import json

import pytest

from qjax import _bench
from qjax.cli import main


@pytest.fixture
def experiments(tmp_path):
    exp = tmp_path / "experiments"
    (exp / "results").mkdir(parents=True)
    (exp / "results" / "old.md").write_text("untouched\n")
    (exp / "bench_sparsify.py").write_text(
        "import pathlib, sys\n"
        "quick = '--fast' in sys.argv\n"
        "args = sys.argv + ['--out', 'experiments/results']  # the default when none is given\n"
        "out = pathlib.Path(args[args.index('--out') + 1])\n"
        "(out / 'sparsify.md').write_text('quick' if quick else 'full')\n"
        "print('| model | x adam |')\nprint('| mlp | 1.01 |')\n"
    )
    (exp / "bench_shrink.py").write_text("import sys\nprint('boom', file=sys.stderr)\nsys.exit(3)\n")
    return exp


def test_runs_selected_benchmarks_and_writes_summary(experiments, tmp_path, capsys):
    out = tmp_path / "summary"
    rc = main(
        [
            "bench",
            "--only",
            "sparsify",
            "--quick",
            "--quiet",
            "--experiments",
            str(experiments),
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "bench_summary.json").read_text())
    [rec] = summary["benchmarks"]
    assert rec["status"] == "ok" and rec["exit_code"] == 0 and summary["quick"] is True
    # --out reaches the script: its results land beside the summary, the checkout's stay as they were
    assert rec["files"] == ["summary/sparsify.md"]  # only what this run wrote
    assert (out / "sparsify.md").read_text() == "quick"  # --quick passed --fast
    assert sorted(p.name for p in (experiments / "results").iterdir()) == ["old.md"]
    assert "| mlp | 1.01 |" in rec["output_tail"]
    md = (out / "bench_summary.md").read_text()
    assert "| sparsify | ok |" in md and f"experiments/bench_sparsify.py --fast --out {out}" in md


def test_without_out_results_go_to_the_checkouts_results(experiments, capsys):
    assert main(["bench", "--only", "sparsify", "--quiet", "--experiments", str(experiments)]) == 0
    [rec] = json.loads((experiments / "results" / "bench_summary.json").read_text())["benchmarks"]
    assert rec["files"] == ["experiments/results/sparsify.md"]
    assert (experiments / "results" / "sparsify.md").read_text() == "full"


def test_every_benchmark_script_declares_out():
    """The real scripts all take the ``--out`` that ``qjax bench --out`` passes on (a file
    for bench_kernels, a directory for the others)."""
    experiments = _bench.default_experiments_dir()
    for b in _bench.BENCHMARKS:
        assert '"--out"' in (experiments / b.script).read_text(), b.script
    kernels = next(b for b in _bench.BENCHMARKS if b.name == "kernels")
    assert kernels.out_args(experiments / "x") == ["--out", str(experiments / "x" / "bench_kernels.json")]


def test_failing_benchmark_is_reported_and_sets_exit_status(experiments, capsys):
    rc = main(["bench", "--only", "shrink", "--quiet", "--experiments", str(experiments)])
    assert rc == 1
    summary = json.loads((experiments / "results" / "bench_summary.json").read_text())
    [rec] = summary["benchmarks"]
    assert rec["status"] == "failed" and rec["exit_code"] == 3 and "boom" in rec["output_tail"]


def test_peers_skipped_when_not_installed(monkeypatch, experiments):
    monkeypatch.setattr(_bench.importlib.util, "find_spec", lambda name: None)
    peers = next(b for b in _bench.BENCHMARKS if b.name == "peers")
    rec = _bench.run_benchmark(peers, experiments, quick=True, timeout=None)
    assert (
        rec["status"] == "skipped" and "qwix" in rec["reason"] and "pip install qjax[peers]" in rec["reason"]
    )


def test_list_and_errors_are_one_line(experiments, tmp_path, capsys):
    assert main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(b.name in listed for b in _bench.BENCHMARKS)
    assert main(["bench", "--only", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown benchmark" in err and "numerics" in err
    assert main(["bench", "--only", "numerics", "--experiments", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bench_numerics.py" in err and "--experiments" in err
    for bad in ("-1", "0", "inf", "soon"):
        assert main(["bench", "--only", "numerics", "--timeout", bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--timeout" in err and "positive number of seconds" in err


def test_default_experiments_dir_is_the_checkouts():
    assert (_bench.default_experiments_dir() / "bench_numerics.py").is_file()

"""``qjax demo`` end to end (``--fast``) and the CLI's error path."""

import json
import os
import subprocess
import sys

import pytest

from qjax.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _demo_environment() -> dict[str, str]:
    """The test process's environment without its XLA flags: the demo runs as ``make demo``
    does (one CPU device, XLA's default optimization; the suite compiles at -O0, which
    makes the demo's training loops about twice as slow)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    # tests/ is not a package: keep the repository importable whatever the working directory
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def test_demo_runs_and_writes_results(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "demo"  # created by the command
    p = subprocess.run(
        [sys.executable, "-m", "qjax.cli", "demo", "--fast", "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        env=_demo_environment(),
        timeout=600,
    )
    stdout, stderr = p.stdout, p.stderr
    assert p.returncode == 0, stderr
    assert stderr == ""  # --quiet: no progress output
    result = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    rows = {r["key"]: r for r in result["rows"]}
    expected = {
        "float",
        "int8_tensor",
        "int8_channel",
        "int4_tensor",
        "int4_channel",
        "int4_group16",
        "int2_channel",
        "int8_channel_mse",
        "fp8_e4m3",
        "w8a8_int",
        "qat_int4_channel",
        "qat_int2_channel",
        "qat_int2_channel_lsq",
        "magnitude90_gradual",
        "nm_2_4",
        "channel50_shrink",
        "fixed16",
        "fixed8",
        "kd_student",
        "mixed_precision",
    }
    assert set(rows) == expected
    for r in rows.values():  # every row is in the printed table and the report
        assert r["method"] in stdout and f"| {r['method']} |" in report
    assert "dequantized for evaluation" in stdout and "dequantized for evaluation" in report
    assert result["fast"] is True and result["seed"] == 0

    float_acc = rows["float"]["accuracy"]
    assert result["float_accuracy"] == float_acc > 0.9
    assert rows["int8_channel"]["accuracy"] >= float_acc - 0.02
    assert rows["w8a8_int"]["accuracy"] >= float_acc - 0.02  # integer execution
    assert rows["float"]["ratio"] == pytest.approx(1.0)
    int8_bytes = rows["int8_channel"]["bytes"]
    for key in ("int4_tensor", "int4_channel", "int4_group16", "qat_int4_channel"):
        assert rows[key]["bytes"] < int8_bytes, key
    assert rows["int2_channel"]["bytes"] < rows["int4_channel"]["bytes"] < int8_bytes < rows["float"]["bytes"]
    # pruning rows: exact sparsity reached inside the optimizer, sparse storage smaller than dense
    assert rows["magnitude90_gradual"]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert rows["nm_2_4"]["sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert rows["magnitude90_gradual"]["bytes"] < rows["nm_2_4"]["bytes"] < rows["float"]["bytes"]
    assert rows["channel50_shrink"]["bytes"] < rows["float"]["bytes"] / 3
    assert rows["channel50_shrink"]["accuracy"] > 0.85
    # fixed point: integer execution close to float; KD student smaller than the teacher
    assert rows["fixed16"]["accuracy"] >= float_acc - 0.02
    assert rows["fixed8"]["bytes"] < rows["fixed16"]["bytes"] < rows["float"]["bytes"]
    assert rows["kd_student"]["bytes"] < rows["float"]["bytes"] / 4 and rows["kd_student"]["accuracy"] > 0.8
    # latency column: every row timed against the float model
    assert rows["float"]["latency_ratio"] == 1.0
    assert all(r["latency_ms"] > 0 and r["latency_ratio"] > 0 for r in rows.values())
    assert "latency x float" in stdout
    # mixed precision: within its budget (about 3 bits/weight), frontier measured, curve starts at float
    mp = rows["mixed_precision"]
    assert rows["int2_channel"]["bytes"] <= mp["bytes"] <= rows["int4_channel"]["bytes"]
    assert len(mp["choice"].split()) == 4 and set(mp["choice"].split()) <= {"int2", "int4", "int8", "float"}
    front = result["mixed_precision_pareto"]
    assert len(front) >= 2 and all(p["accuracy"] is not None for p in front)
    assert [p["bytes"] for p in front] == sorted(p["bytes"] for p in front)
    curve = result["sparsity_curve"]
    assert curve[0]["sparsity"] == 0.0 and curve[0]["accuracy"] == float_acc
    assert curve[-1]["accuracy"] < float_acc
    for key in ("qat_int4_channel", "qat_int2_channel", "qat_int2_channel_lsq"):
        # quantize-then-dequantize evaluates exactly like the fake-quant forward pass
        assert rows[key]["accuracy"] == rows[key]["fake_quant_accuracy"], key
        assert rows[key]["accuracy"] > 0.85, key
    pytest.importorskip("matplotlib")
    for name in ("accuracy_vs_size.png", "sparsity_curve.png", "mixed_precision_pareto.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_out_pointing_at_a_file_fails_with_one_line(tmp_path, capsys):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    rc = main(["demo", "--fast", "--quiet", "--out", str(target)])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.count("\n") == 1 and err.startswith("qjax: error:") and str(target) in err
    assert "Traceback" not in err


def test_bad_arguments_fail_with_one_line(capsys):
    assert main(["demo", "--seed", "minus-one"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--seed" in err
    assert main(["no-such-command"]) != 0
    assert capsys.readouterr().err.count("\n") == 1


def test_missing_sklearn_names_the_extra(tmp_path, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` fail
    rc = main(["demo", "--fast", "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "pip install qjax[experiments]" in err


def test_a_closed_output_pipe_ends_quietly(monkeypatch, capsys):
    """``qjax bench --list | head``: the reader closing early is not an internal error."""
    from qjax import _bench

    def closed(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(_bench, "cmd_bench", closed)
    assert main(["bench", "--list"]) == 141
    assert "internal error" not in capsys.readouterr().err

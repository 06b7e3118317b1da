"""``qjax compress --config FILE``: the example end to end (fast config), a plain-function
model, and every user mistake as one line with exit status 2."""

import argparse
import json
import sys
from pathlib import Path

import pytest

from qjax import cli
from qjax._cli_common import CLIError
from qjax._compress import add_compress_parser, run_compress
from qjax._compress_config import read_config, validate_config

EXAMPLE = Path(__file__).resolve().parents[1] / "experiments" / "compress_example"

TINY = """
import jax.numpy as jnp
import numpy as np
import optax


def build(seed=0, drop=()):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    y = (x @ w).argmax(-1)
    params = {"dense": {"kernel": jnp.asarray(w + 0.1 * rng.normal(size=w.shape)), "bias": jnp.zeros(4)}}
    out = {
        "apply_fn": lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"],
        "params": params,
        "batches": [(x[:32], y[:32]), (x[32:], y[32:])],
        "eval_fn": lambda f, p: float(jnp.mean(f(p, x).argmax(-1) == y)),
        "loss_fn": lambda o, t: optax.softmax_cross_entropy_with_integer_labels(o, t).mean(),
    }
    return {k: v for k, v in out.items() if k not in drop}


def student(seed=0):
    return {"apply_fn": lambda p, x: x @ p["k"], "params": {"k": jnp.zeros((8, 4))}}


def broken():
    raise RuntimeError("boom in user code")
"""

INT8 = {"pattern": ".*/kernel", "weight": {"format": "int8", "channel_axes": [-1]}}


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.fixture
def qjax_main(monkeypatch):
    """``qjax.cli.main``, with ``compress`` added to its parser if cli.py does not wire it yet."""
    if "compress" not in _subparsers(cli.build_parser()).choices:
        original = cli.build_parser

        def build_parser():
            parser = original()
            add_compress_parser(_subparsers(parser))
            return parser

        monkeypatch.setattr(cli, "build_parser", build_parser)
    return cli.main


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    return tmp_path


def _write(folder: Path, config, name="config.json") -> str:
    path = folder / name
    path.write_text(config if isinstance(config, str) else json.dumps(config, indent=2))
    return str(path)


def _one_line_error(main, argv, capsys) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("qjax: error: "), err
    assert "Traceback" not in err
    return err


def test_example_fast_config_end_to_end(qjax_main, tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "out"
    rc = qjax_main(["compress", "--config", str(EXAMPLE / "config_fast.json"), "--out", str(out), "--quiet"])
    stdout, stderr = capsys.readouterr()
    assert rc == 0, stderr
    assert stderr == ""  # --quiet
    result = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    rows = result["rows"]
    assert rows[0]["key"] == "float" and rows[0]["method"] == "float (as given)"
    assert rows[0]["ratio"] == pytest.approx(1.0)
    assert [r["kind"] for r in rows] == [
        "float",
        "ptq",
        "ptq",
        "ptq",
        "qat",
        "prune",
        "prune",
        "prune",
        "distill",
    ]
    for r in rows:
        assert r["method"] in stdout and f"| {r['method']} |" in report
        assert set(r) >= {"key", "kind", "method", "accuracy", "bytes", "ratio", "seconds", "latency_ratio"}
        assert r["latency_ms"] > 0
    assert rows[0]["latency_ratio"] == 1.0 and "latency x float" in stdout
    by = {r["key"]: r for r in rows}
    float_acc, float_bytes = by["float"]["accuracy"], by["float"]["bytes"]
    assert float_acc > 0.9
    assert by["ptq_int8_per_channel"]["accuracy"] >= float_acc - 0.02
    assert by["w8a8_integer_execution"]["accuracy"] >= float_acc - 0.02
    assert by["ptq_int4_groups_of_16"]["bytes"] < by["ptq_int8_per_channel"]["bytes"] < float_bytes / 3
    assert by["prune_80_gradual_global"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert by["2_4_sparsity"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for key in ("prune_80_gradual_global", "2_4_sparsity", "channel_pruning_50_shrink"):
        assert by[key]["bytes"] < float_bytes, key
    assert by["kd_student_64_32_10"]["bytes"] < float_bytes / 5
    assert result["entry"] == "model.py:build" and result["seed"] == 0


def test_toml_config_equals_json():
    a = validate_config(read_config(EXAMPLE / "config.json"))
    b = validate_config(read_config(EXAMPLE / "config.toml"))
    assert a == b


def test_plain_function_model_all_kinds(tiny):
    config = {
        "entry": "tiny.py:build",
        "steps": [
            {"name": "int8", "kind": "ptq", "rules": [INT8]},
            {
                "name": "w8a8",
                "kind": "ptq",
                "execute": "integer",
                "histogram_bins": 256,
                "rules": [
                    {**INT8, "act": {"format": "int8", "calibration": "percentile:99.9"}},
                    {"pattern": ".*/bias"},
                ],
            },
            {
                "name": "lsq",
                "kind": "qat",
                "steps": 4,
                "rules": [{"pattern": ".*/kernel", "weight": {"format": "int4", "ste": "lsq"}}],
            },
            {
                "name": "prune",
                "kind": "prune",
                "sparsity": 0.5,
                "steps": 4,
                "rules": [{"pattern": "dense/kernel", "sparsity": 0.75}],
            },
            {"name": "2:4", "kind": "prune", "type": "2:4", "steps": 2},
            {"name": "kd", "kind": "distill", "student": "tiny.py:student", "steps": 4},
        ],
    }
    result = run_compress(config, base_dir=tiny, quiet=True)
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["float", "int8", "w8a8", "lsq", "prune", "2_4", "kd"]
    assert rows["int8"]["accuracy"] >= rows["float"]["accuracy"] - 0.05
    assert rows["prune"]["sparsity"] == pytest.approx(0.75)  # the rule's sparsity
    assert rows["kd"]["bytes"] == 8 * 4 * 4
    assert str(tiny) not in sys.path  # the entry's folder is not left on sys.path


def test_yaml_config(tiny, monkeypatch, capsys, qjax_main):
    pytest.importorskip("yaml")
    path = _write(
        tiny,
        "entry: tiny.py:build\nsteps:\n  - {name: int8, kind: ptq, rules: [{pattern: '.*/kernel', "
        "weight: {format: int8}}]}\n",
        "c.yaml",
    )
    assert qjax_main(["compress", "--config", path, "--quiet"]) == 0
    assert "int8" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "yaml", None)  # as if PyYAML were not installed
    err = _one_line_error(qjax_main, ["compress", "--config", path], capsys)
    assert "pyyaml" in err and ".json" in err and ".toml" in err


BAD_CONFIGS = {
    "unknown top-level key": (
        {"entry": "tiny.py:build", "stepz": []},
        ["config.json: top level: unknown key 'stepz'", "allowed: entry, entry_args, steps"],
    ),
    "unknown step key": (
        {"entry": "tiny.py:build", "steps": [{"name": "q", "kind": "qat", "rules": [INT8], "lrr": 1}]},
        ["steps[0] ('q'): unknown key 'lrr'", "allowed: name, kind, rules, steps, lr"],
    ),
    "unknown step kind": (
        {"entry": "tiny.py:build", "steps": [{"kind": "quantise"}]},
        ["steps[0]: unknown kind 'quantise'", "ptq, qat, prune, distill"],
    ),
    "unknown format": (
        {
            "entry": "tiny.py:build",
            "steps": [{"kind": "ptq", "rules": [{"pattern": "x", "weight": {"format": "int9x"}}]}],
        },
        ["rules[0] weight: unknown format 'int9x'", "valid names: int2", "fp8_e4m3"],
    ),
    "unsigned symmetric weight": (
        {
            "entry": "tiny.py:build",
            "steps": [{"kind": "ptq", "rules": [{"pattern": ".*/kernel", "weight": {"format": "uint8"}}]}],
        },
        ["rules[0] weight: an unsigned symmetric format (uint8) clamps every negative weight", "symmetric"],
    ),
    "rule matching nothing": (
        {
            "entry": "tiny.py:build",
            "steps": [{"name": "q", "kind": "ptq", "rules": [{**INT8, "pattern": ".*/kernal"}]}],
        },
        ["config.json: steps[0] ('q') rules[0]: pattern '.*/kernal' matches no parameter", "dense/kernel"],
    ),
    "pruning rule matching nothing": (
        {
            "entry": "tiny.py:build",
            "steps": [{"kind": "prune", "sparsity": 0.5, "rules": [{"pattern": "nope"}]}],
        },
        ["pruning rule pattern 'nope' matches no parameter"],
    ),
    "entry file missing": (
        {"entry": "nofile.py:build", "steps": [{"kind": "ptq", "rules": [INT8]}]},
        ["entry 'nofile.py:build': file", "nofile.py not found"],
    ),
    "entry module missing": (
        {"entry": "no_such_pkg.models:build", "steps": [{"kind": "ptq", "rules": [INT8]}]},
        ["entry 'no_such_pkg.models:build': cannot import module 'no_such_pkg.models'"],
    ),
    "entry function missing": (
        {"entry": "tiny.py:biuld", "steps": [{"kind": "ptq", "rules": [INT8]}]},
        ["entry 'tiny.py:biuld': tiny.py has no function 'biuld'", "functions there: broken, build, student"],
    ),
    "entry without eval_fn": (
        {
            "entry": "tiny.py:build",
            "entry_args": {"drop": ["eval_fn"]},
            "steps": [{"kind": "ptq", "rules": [INT8]}],
        },
        ["entry 'tiny.py:build' returned no 'eval_fn'"],
    ),
    "training step without loss_fn": (
        {
            "entry": "tiny.py:build",
            "entry_args": {"drop": ["loss_fn"]},
            "steps": [{"name": "p", "kind": "prune", "sparsity": 0.5}],
        },
        ["steps[0] ('p'): a prune step trains, so entry 'tiny.py:build' must also return 'loss_fn'"],
    ),
    "channel pruning without module": (
        {"entry": "tiny.py:build", "steps": [{"kind": "prune", "type": "channel", "sparsity": 0.5}]},
        ["must also return 'module'"],
    ),
    "inexact_norms not a bool": (
        {
            "entry": "tiny.py:build",
            "steps": [{"kind": "prune", "type": "channel", "sparsity": 0.5, "inexact_norms": 1}],
        },
        ["'inexact_norms' must be true or false, got 1"],
    ),
    "inexact_norms on unstructured pruning": (
        {"entry": "tiny.py:build", "steps": [{"kind": "prune", "sparsity": 0.5, "inexact_norms": True}]},
        ["'inexact_norms' applies to type 'channel' only, not 'unstructured'"],
    ),
    "entry raising": (
        {"entry": "tiny.py:broken", "steps": [{"kind": "ptq", "rules": [INT8]}]},
        ["entry 'tiny.py:broken' raised RuntimeError: boom in user code", "--debug"],
    ),
    "bad entry_args": (
        {"entry": "tiny.py:build", "entry_args": {"epochs": 3}, "steps": [{"kind": "ptq", "rules": [INT8]}]},
        [
            "entry 'tiny.py:build': the arguments ['epochs'] do not fit build(",
            "unexpected keyword argument 'epochs'",
        ],
    ),
    "bad value": (
        {"entry": "tiny.py:build", "steps": [{"kind": "prune", "sparsity": 1.5}]},
        ["'sparsity' must be a number in [0, 1), got 1.5"],
    ),
    "histogram bins not a power of two": (
        {"entry": "tiny.py:build", "steps": [{"kind": "ptq", "rules": [INT8], "histogram_bins": 1000}]},
        ["'histogram_bins' must be a power of two >= 2, got 1000"],
    ),
    "group size not dividing": (
        {
            "entry": "tiny.py:build",
            "steps": [
                {
                    "name": "g",
                    "kind": "ptq",
                    "rules": [
                        {
                            "pattern": ".*/kernel",
                            "weight": {"format": "int4", "group_size": 3, "group_axis": 0},
                        }
                    ],
                }
            ],
        },
        ["steps[0] ('g') failed: ValueError: leaf 'dense/kernel'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_config_mistakes_are_one_line(case, tiny, qjax_main, capsys):
    config, expected = BAD_CONFIGS[case]
    path = _write(tiny, config)
    err = _one_line_error(qjax_main, ["compress", "--config", path, "--quiet"], capsys)
    for text in expected:
        assert text in err, (text, err)


def test_missing_config_file(tmp_path, qjax_main, capsys):
    err = _one_line_error(qjax_main, ["compress", "--config", str(tmp_path / "nope.json")], capsys)
    assert "nope.json: no such file" in err


def test_invalid_json_names_the_line(tmp_path, qjax_main, capsys):
    path = _write(tmp_path, '{\n  "entry": "m.py:build",\n  "steps": [\n}\n')
    err = _one_line_error(qjax_main, ["compress", "--config", path], capsys)
    assert "invalid JSON at line 4" in err


def test_invalid_toml_and_extension(tmp_path, qjax_main, capsys):
    err = _one_line_error(
        qjax_main, ["compress", "--config", _write(tmp_path, 'entry = "a\n', "c.toml")], capsys
    )
    assert "invalid TOML" in err and "line 1" in err
    err = _one_line_error(qjax_main, ["compress", "--config", _write(tmp_path, "{}", "c.ini")], capsys)
    assert "unsupported extension '.ini'" in err


def test_config_option_is_required(qjax_main, capsys):
    _one_line_error(qjax_main, ["compress"], capsys)


def test_debug_shows_the_traceback(tiny, qjax_main, capsys):
    path = _write(tiny, BAD_CONFIGS["entry raising"][0])
    assert qjax_main(["compress", "--config", path, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "boom in user code" in err


def test_run_compress_raises_cli_error(tiny):
    with pytest.raises(CLIError, match="unknown kind"):
        run_compress({"entry": "tiny.py:build", "steps": [{"kind": "x"}]}, base_dir=tiny)


NORM_MODEL = """
import flax.linen as nn
import jax
import numpy as np
import optax


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(nn.Dense(16, name="up")(x))
        return nn.Dense(4, name="head")(nn.relu(h))


def build(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 8)).astype(np.float32)
    y = (x[:, :4]).argmax(-1)
    module = Net()
    return {
        "apply_fn": module.apply,
        "params": module.init(jax.random.key(seed), x[:1]),
        "module": module,
        "batches": [(x[:32], y[:32]), (x[32:], y[32:])],
        "eval_fn": lambda f, p: float((f(p, x).argmax(-1) == y).mean()),
        "loss_fn": lambda o, t: optax.softmax_cross_entropy_with_integer_labels(o, t).mean(),
    }
"""


def test_channel_pruning_across_a_layer_norm_with_inexact_norms(tmp_path):
    # the hidden width feeds a LayerNorm, which averages over it: shrinking it changes the
    # function, so it is pruned only when the config opts in
    (tmp_path / "norm.py").write_text(NORM_MODEL)
    step = {"kind": "prune", "type": "channel", "sparsity": 0.5, "steps": 2}
    skip_head = [{"pattern": ".*head/kernel", "sparsity": None}]
    config = {
        "entry": "norm.py:build",
        "steps": [
            {**step, "name": "exact", "rules": skip_head},
            {**step, "name": "inexact", "inexact_norms": True, "rules": skip_head},
        ],
    }
    rows = {r["key"]: r for r in run_compress(config, base_dir=tmp_path, quiet=True)["rows"]}
    assert rows["exact"]["bytes"] == rows["float"]["bytes"]  # the group is blocked by the norm
    # up (8x8 + 8), norm (8 + 8), head (8x4 + 4) float32 values
    assert rows["inexact"]["bytes"] == 4 * (8 * 8 + 8 + 8 + 8 + 8 * 4 + 4)

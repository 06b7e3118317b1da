"""``qjax compress``: reading and checking the config file (entry functions are loaded by
``qjax._compress_entry``). Every mistake is a :class:`CLIError` of one line that says what is wrong, where,
and what is allowed.

Config (JSON, TOML, or YAML when PyYAML is installed); unknown keys are errors::

    entry        "path/to/file.py:function" (relative to the config's folder) or
                 "package.module:function"; called with entry_args (plus seed=--seed when it
                 has a `seed` parameter) and returns {apply_fn, params, batches, eval_fn,
                 [loss_fn], [module]}
    entry_args   optional keyword arguments of the entry
    steps        a non-empty list; every step has "kind" and an optional "name":
      ptq      rules, execute ("dequantized" | "integer"), calibration_batches (8),
               histogram_bins (percentile / MSE ranges of all batches pooled, e.g. 2048)
      qat      rules, steps (300), lr (3e-4)                   weight specs only
      prune    sparsity, type ("unstructured" | "channel" | "N:M" e.g. "2:4"),
               scope ("layer" | "global"), schedule ("gradual" | "one_shot"; N:M and
               channel: one_shot), inexact_norms (channel only, false: prune widths a
               LayerNorm / RMSNorm averages over, as Torch-Pruning does; the shrunk model
               then differs from the masked one), rules, steps (300), lr (3e-4)
      distill  student ("file.py:function"), student_args, temperature (4.0), alpha (0.7),
               steps (500), lr (1e-3)

    quantization rule  {"pattern": REGEX, "weight": SPEC or null, "act": SPEC or null}
                       (both null: leave the matched leaves alone; first match wins)
    SPEC               {"format": "int8", "channel_axes": [-1], "group_size": 16,
                        "group_axis": 0, "pad_groups": false, "symmetric": true,
                        "tile_size": 128, "tile_axis": -1 (2-D tiles with groups),
                        "ste": "plain" | "clipped" | "lsq",
                        "calibration": "absmax" | "minmax" | "mse" | "percentile:99.9"}
    pruning rule       {"pattern": REGEX, "sparsity": number or null (null: not pruned)}

A rule that matches no parameter is an error naming its pattern.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import qjax
from qjax._cli_common import CLIError
from qjax.numerics.spec import STE_MODES

TOP_KEYS = ("entry", "entry_args", "steps")
KINDS = ("ptq", "qat", "prune", "distill")
STEP_KEYS = {
    "ptq": ("name", "kind", "rules", "execute", "calibration_batches", "histogram_bins"),
    "qat": ("name", "kind", "rules", "steps", "lr"),
    "prune": (
        "name",
        "kind",
        "sparsity",
        "type",
        "scope",
        "schedule",
        "inexact_norms",
        "rules",
        "steps",
        "lr",
    ),
    "distill": ("name", "kind", "student", "student_args", "temperature", "alpha", "steps", "lr"),
}
RULE_KEYS = ("pattern", "weight", "act")
PRUNE_RULE_KEYS = ("pattern", "sparsity")
SPEC_KEYS = (
    "format",
    "channel_axes",
    "group_size",
    "group_axis",
    "tile_size",
    "tile_axis",
    "pad_groups",
    "symmetric",
    "ste",
    "calibration",
)
ENTRY_KEYS = ("apply_fn", "params", "batches", "eval_fn", "loss_fn", "module")
ENTRY_REQUIRED = ("apply_fn", "params", "batches", "eval_fn")
STUDENT_REQUIRED = ("apply_fn", "params")
_BITS = (2, 3, 4, 5, 6, 7, 8, 16)
FORMAT_NAMES = (
    *(f"int{b}" for b in _BITS),
    *(f"uint{b}" for b in _BITS),
    *(f"int{b}_narrow" for b in _BITS),
    "fp8_e4m3",
    "fp8_e5m2",
)
CALIBRATIONS = ("absmax", "minmax", "mse", "percentile", "percentile:P")
DEFAULTS = {
    "qat": {"steps": 300, "lr": 3e-4},
    "prune": {"steps": 300, "lr": 3e-4, "type": "unstructured", "scope": "layer"},
    "distill": {"steps": 500, "lr": 1e-3, "temperature": 4.0, "alpha": 0.7},
}


class ConfigError(CLIError):
    """A mistake in the config file itself (``cmd_compress`` prefixes the file name)."""


@dataclasses.dataclass(frozen=True)
class Step:
    """One validated step: ``opts`` holds every option of its kind, defaults filled in;
    ``policy`` is the quantization policy of ptq/qat steps; ``prune_rules`` are
    ``(pattern, sparsity or None)`` pairs."""

    index: int
    key: str
    name: str
    kind: str
    opts: dict[str, Any]
    policy: Any = None
    prune_rules: tuple = ()

    @property
    def where(self) -> str:
        return f"steps[{self.index}] ({self.name!r})"


@dataclasses.dataclass(frozen=True)
class Config:
    entry: str
    entry_args: dict[str, Any]
    steps: tuple[Step, ...]


# -- reading the file --------------------------------------------------------------------------


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed config file (a dict), by extension: ``.json``, ``.toml``, ``.yaml``/``.yml``.

    Raises:
      CLIError: missing/unreadable file, unknown extension, a syntax error (with its line).
    """
    p = Path(path)
    if not p.exists():
        raise CLIError(f"--config {path}: no such file")
    if p.is_dir():
        raise CLIError(f"--config {path}: is a directory, not a config file")
    ext = p.suffix.lower()
    if ext not in (".json", ".toml", ".yaml", ".yml"):
        raise CLIError(f"--config {path}: unsupported extension {ext or '(none)'!r}; use .json or .toml")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CLIError(f"--config {path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    elif ext == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise CLIError(f"{path}: invalid TOML: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise CLIError(
                f"{path}: YAML configs need PyYAML, which is not installed; use a .json or .toml "
                "config, or `pip install pyyaml`"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise CLIError(f"{path}: invalid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path}: the config must be a mapping with keys {', '.join(TOP_KEYS)}")
    return data


# -- checking values ---------------------------------------------------------------------------


def _fail(where: str, msg: str):
    raise ConfigError(f"{where}: {msg}")


def _check_keys(d: Any, allowed: tuple[str, ...], where: str, what: str) -> None:
    if not isinstance(d, Mapping):
        _fail(where, f"must be a mapping ({what}), got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            _fail(where, f"unknown key {k!r}; allowed: {', '.join(allowed)}")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pos_int(v, where, key):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        _fail(where, f"{key!r} must be a positive integer, got {v!r}")
    return v


def _pos_float(v, where, key):
    if not _is_num(v) or v <= 0:
        _fail(where, f"{key!r} must be a positive number, got {v!r}")
    return float(v)


def _fraction(v, where, key, hi_open=False):
    if not _is_num(v) or v < 0 or v > 1 or (hi_open and v == 1):
        _fail(where, f"{key!r} must be a number in [0, 1{')' if hi_open else ']'}, got {v!r}")
    return float(v)


def _choice(v, choices, where, key):
    if v not in choices:
        _fail(where, f"{key!r} must be one of {', '.join(map(str, choices))}; got {v!r}")
    return v


def _calibration(v, where):
    if not isinstance(v, str):
        _fail(where, f"'calibration' must be a string ({', '.join(CALIBRATIONS)}), got {v!r}")
    name, _, arg = v.partition(":")
    if name == "absmax" and not arg:
        return qjax.calib.absmax()
    if name == "minmax" and not arg:
        return qjax.calib.minmax()
    if name == "mse" and not arg:
        return qjax.calib.mse()
    if name == "percentile":
        try:
            p = float(arg) if arg else 99.99
        except ValueError:
            p = None
        if p is not None and 0 < p <= 100:
            return qjax.calib.percentile(p)
        _fail(
            where, f"calibration {v!r}: the percentile must be a number in (0, 100], e.g. 'percentile:99.9'"
        )
    _fail(where, f"unknown calibration {v!r}; expected one of {', '.join(CALIBRATIONS)}")


def _spec(d: Any, where: str) -> Any:
    """A ``qjax.QuantSpec`` from a weight/act spec mapping."""
    _check_keys(d, SPEC_KEYS, where, "a quantization spec")
    if "format" not in d:
        _fail(where, f"missing 'format' (one of {', '.join(FORMAT_NAMES)})")
    fmt = d["format"]
    try:
        fmt = qjax.format_from_name(fmt)
    except (ValueError, TypeError):
        _fail(where, f"unknown format {fmt!r}; valid names: {', '.join(FORMAT_NAMES)}")
    kw: dict[str, Any] = {}
    if "channel_axes" in d:
        axes = d["channel_axes"]
        if isinstance(axes, int) and not isinstance(axes, bool):
            axes = [axes]
        if not isinstance(axes, list) or not all(
            isinstance(a, int) and not isinstance(a, bool) for a in axes
        ):
            _fail(
                where,
                f"'channel_axes' must be a list of integers (e.g. [-1]; [] is per-tensor), got {axes!r}",
            )
        kw["channel_axes"] = tuple(axes)
    for key in ("group_size", "group_axis", "tile_size", "tile_axis"):
        if key in d:
            v = d[key]
            positive = key.endswith("_size")
            if not isinstance(v, int) or isinstance(v, bool) or (positive and v < 1):
                _fail(where, f"{key!r} must be {'a positive' if positive else 'an'} integer, got {v!r}")
            kw[key] = v
    for key in ("symmetric", "pad_groups"):
        if key in d:
            if not isinstance(d[key], bool):
                _fail(where, f"{key!r} must be true or false, got {d[key]!r}")
            kw[key] = d[key]
    if "ste" in d:
        kw["ste"] = _choice(d["ste"], STE_MODES, where, "ste")
    if "calibration" in d:
        kw["calibration"] = _calibration(d["calibration"], where)
    try:
        return qjax.QuantSpec(fmt, **kw)
    except (TypeError, ValueError) as e:
        _fail(where, str(e))


def _rules(step: dict, where: str, *, acts: bool) -> Any:
    rules = step.get("rules")
    if rules is None:
        _fail(where, 'missing \'rules\' (a list of {"pattern": ..., "weight": {...}})')
    if not isinstance(rules, list) or not rules:
        _fail(where, "'rules' must be a non-empty list")
    out = []
    for j, r in enumerate(rules):
        rw = f"{where} rules[{j}]"
        _check_keys(r, RULE_KEYS, rw, "a rule")
        if not isinstance(r.get("pattern"), str):
            _fail(
                rw,
                f"missing or non-string 'pattern' (a regular expression over parameter paths), "
                f"got {r.get('pattern')!r}",
            )
        weight = None if r.get("weight") is None else _spec(r["weight"], f"{rw} weight")
        unsigned = weight is not None and not weight.format.is_float and not weight.format.signed
        if unsigned and weight.symmetric:
            _fail(
                f"{rw} weight",
                f"an unsigned symmetric format ({weight.format.name}) clamps every negative weight to 0: "
                'use a signed format, or "symmetric": false for an unsigned one with a zero point',
            )
        act = None if r.get("act") is None else _spec(r["act"], f"{rw} act")
        if act is not None and not acts:
            _fail(rw, '\'act\' specs need a ptq step with "execute": "integer"')
        try:
            out.append(qjax.Rule(r["pattern"], weight=weight, act=act))
        except (TypeError, ValueError) as e:
            _fail(rw, str(e))
    return qjax.Policy(out)


_NM = re.compile(r"(\d+):(\d+)")


def _prune_opts(step: dict, opts: dict, where: str) -> tuple:
    stype = opts["type"]
    nm = _NM.fullmatch(stype) if isinstance(stype, str) else None
    if nm is None and stype not in ("unstructured", "channel"):
        _fail(where, f"'type' must be one of unstructured, channel, N:M (e.g. 2:4); got {stype!r}")
    _choice(opts["scope"], ("layer", "global"), where, "scope")
    if nm:
        n, m = int(nm.group(1)), int(nm.group(2))
        if not 0 < n <= m:
            _fail(where, f"'type' {stype!r}: N:M needs 0 < N <= M")
        implied = 1 - n / m
        if "sparsity" in step and abs(_fraction(step["sparsity"], where, "sparsity") - implied) > 1e-9:
            _fail(
                where,
                f"'type' {stype!r} fixes the sparsity at {implied:g}; drop 'sparsity' or set it to that",
            )
        opts["sparsity"] = implied
    elif "sparsity" not in step:
        _fail(where, f"missing 'sparsity' (the fraction of weights removed, in [0, 1)) for type {stype!r}")
    else:
        opts["sparsity"] = _fraction(step["sparsity"], where, "sparsity", hi_open=True)
    inexact = opts.setdefault("inexact_norms", False)
    if not isinstance(inexact, bool):
        _fail(where, f"'inexact_norms' must be true or false, got {inexact!r}")
    if inexact and stype != "channel":
        _fail(where, f"'inexact_norms' applies to type 'channel' only, not {stype!r}")
    one_shot_only = bool(nm) or stype == "channel"
    opts.setdefault("schedule", "one_shot" if one_shot_only else "gradual")
    _choice(opts["schedule"], ("gradual", "one_shot"), where, "schedule")
    if one_shot_only and opts["schedule"] != "one_shot":
        _fail(where, f"type {stype!r} is pruned one-shot; drop 'schedule' or set it to 'one_shot'")
    if opts["schedule"] == "gradual" and opts["steps"] < 2:
        _fail(where, 'gradual pruning needs \'steps\' >= 2 (or "schedule": "one_shot")')
    rules = step.get("rules", [])
    if not isinstance(rules, list):
        _fail(where, '\'rules\' must be a list of {"pattern": ..., "sparsity": number or null}')
    out = []
    for j, r in enumerate(rules):
        rw = f"{where} rules[{j}]"
        _check_keys(r, PRUNE_RULE_KEYS, rw, "a pruning rule")
        if not isinstance(r.get("pattern"), str):
            _fail(rw, f"missing or non-string 'pattern', got {r.get('pattern')!r}")
        try:
            qjax.rules.compile_pattern(r["pattern"])
        except ValueError as e:
            _fail(rw, str(e))
        s = r.get("sparsity")
        out.append((r["pattern"], None if s is None else _fraction(s, rw, "sparsity")))
    return tuple(out)


def _entry_str(v, where, key):
    if not isinstance(v, str) or ":" not in v:
        _fail(where, f"{key!r} must be 'path/to/file.py:function' or 'package.module:function', got {v!r}")
    return v


def _kwargs(v, where, key):
    if not isinstance(v, Mapping) or not all(isinstance(k, str) for k in v):
        _fail(where, f"{key!r} must be a mapping of keyword arguments, got {v!r}")
    return dict(v)


def _slug(name: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "step"


def validate_config(config: Any) -> Config:
    """Check ``config`` (the parsed file) strictly and return it normalised.

    Raises:
      ConfigError: the first problem, naming the key, where it is and what is allowed.
    """
    _check_keys(config, TOP_KEYS, "top level", "the top level")
    if "entry" not in config:
        _fail("top level", "missing 'entry' (e.g. \"model.py:build\")")
    entry = _entry_str(config["entry"], "top level", "entry")
    entry_args = _kwargs(config.get("entry_args", {}), "top level", "entry_args")
    steps = config.get("steps")
    if not isinstance(steps, list) or not steps:
        _fail("top level", "'steps' must be a non-empty list of steps")
    out, keys = [], set()
    for i, s in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(s, Mapping):
            _fail(where, f"must be a mapping, got {type(s).__name__}")
        kind = s.get("kind")
        if kind is None:
            _fail(where, f"missing 'kind' (one of {', '.join(KINDS)})")
        if kind not in KINDS:
            _fail(where, f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        name = s.get("name", f"{kind} (step {i})")
        if not isinstance(name, str) or not name.strip():
            _fail(where, f"'name' must be a non-empty string, got {name!r}")
        where = f"steps[{i}] ({name!r})"
        _check_keys(s, STEP_KEYS[kind], where, f"a {kind} step")
        opts = {
            **DEFAULTS.get(kind, {}),
            **{k: v for k, v in s.items() if k not in ("name", "kind", "rules")},
        }
        for k in ("steps", "calibration_batches"):
            if k in opts:
                _pos_int(opts[k], where, k)
        for k in ("lr", "temperature"):
            if k in opts:
                opts[k] = _pos_float(opts[k], where, k)
        policy, prune_rules = None, ()
        if kind == "ptq":
            opts["execute"] = _choice(
                s.get("execute", "dequantized"), ("dequantized", "integer"), where, "execute"
            )
            opts.setdefault("calibration_batches", 8)
            bins = opts.setdefault("histogram_bins", None)
            if bins is not None and (_pos_int(bins, where, "histogram_bins") < 2 or bins & (bins - 1)):
                _fail(where, f"'histogram_bins' must be a power of two >= 2, got {bins!r}")
            policy = _rules(s, where, acts=opts["execute"] == "integer")
        elif kind == "qat":
            policy = _rules(s, where, acts=False)
        elif kind == "prune":
            prune_rules = _prune_opts(s, opts, where)
        else:
            if "student" not in s:
                _fail(where, "missing 'student' (e.g. \"model.py:build_student\")")
            _entry_str(s["student"], where, "student")
            opts["student_args"] = _kwargs(s.get("student_args", {}), where, "student_args")
            opts["alpha"] = _fraction(opts["alpha"], where, "alpha")
        key = base = _slug(name)
        n = 2
        while key in keys or key == "float":
            key, n = f"{base}_{n}", n + 1
        keys.add(key)
        out.append(Step(i, key, name, kind, opts, policy, prune_rules))
    return Config(entry, entry_args, tuple(out))


# -- the user's entry functions ----------------------------------------------------------------

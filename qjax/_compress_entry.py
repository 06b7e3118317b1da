"""``qjax compress``: loading the user's entry functions (``"file.py:function"`` or
``"package.module:function"``) and checking what they return. Every mistake is a one-line
:class:`CLIError`."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import qjax
from qjax._cli_common import CLIError, first_line
from qjax._compress_config import ENTRY_KEYS


def _load_file(file: Path, spec: str, what: str, modules: dict) -> Any:
    key = str(file.resolve())
    if key in modules:
        return modules[key]
    name = f"_qjax_compress_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}_{len(modules)}"
    mspec = importlib.util.spec_from_file_location(name, file)
    if mspec is None or mspec.loader is None:
        raise CLIError(f"{what} {spec!r}: cannot load {file} as a Python module")
    module = importlib.util.module_from_spec(mspec)
    folder = str(file.parent.resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)  # sibling imports of the user's file (removed by the caller)
    sys.modules[name] = module
    try:
        mspec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise CLIError(
            f"{what} {spec!r}: importing {file} raised {type(e).__name__}: {first_line(e)} "
            "(rerun with --debug for the traceback)"
        ) from e
    modules[key] = module
    return module


def load_function(spec: str, base_dir: Path, what: str, modules: dict) -> Callable:
    """The function named by ``spec`` (``file.py:function`` relative to ``base_dir``, or
    ``package.module:function``); ``modules`` caches loaded files.

    Raises:
      CLIError: the file or module cannot be found or imported, or has no such function.
    """
    target, _, fname = spec.rpartition(":")
    if not target or not fname.isidentifier():
        raise CLIError(f"{what} {spec!r}: expected 'path/to/file.py:function' or 'package.module:function'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        file = Path(target) if Path(target).is_absolute() else Path(base_dir) / target
        if not file.is_file():
            raise CLIError(f"{what} {spec!r}: file {file} not found")
        module, mname = _load_file(file, spec, what, modules), file.name
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise CLIError(f"{what} {spec!r}: cannot import module {target!r} ({first_line(e)})") from None
        except Exception as e:
            raise CLIError(
                f"{what} {spec!r}: importing {target!r} raised {type(e).__name__}: {first_line(e)} "
                "(rerun with --debug for the traceback)"
            ) from e
        mname = target
    fn = getattr(module, fname, None)
    if fn is None or not callable(fn):
        found = sorted(
            n
            for n, v in vars(module).items()
            if inspect.isfunction(v)
            and not n.startswith("_")
            and getattr(v, "__module__", None) == module.__name__
        )
        has = f"; functions there: {', '.join(found)}" if found else ""
        raise CLIError(
            f"{what} {spec!r}: {mname} has no {'callable ' if fn is not None else ''}function {fname!r}{has}"
        )
    return fn


def call_entry(fn: Callable, spec: str, what: str, kwargs: dict, seed: int, required: tuple) -> dict:
    """Call the entry with ``kwargs`` (plus ``seed=`` when it takes one and ``kwargs`` does
    not set it) and check the dict it returns.

    Raises:
      CLIError: the arguments do not fit, the call raises, or the result lacks a key or has
        one of the wrong kind.
    """
    given, kwargs = sorted(kwargs), dict(kwargs)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        sig = None
    if sig is not None:
        if "seed" in sig.parameters and "seed" not in kwargs:
            kwargs["seed"] = seed
        try:
            sig.bind(**kwargs)
        except TypeError as e:
            args = f"the arguments {given}" if given else "no arguments"
            raise CLIError(f"{what} {spec!r}: {args} do not fit {fn.__name__}{sig}: {e}") from None
    try:
        out = fn(**kwargs)
    except CLIError:
        raise
    except Exception as e:
        raise CLIError(
            f"{what} {spec!r} raised {type(e).__name__}: {first_line(e)} "
            "(rerun with --debug for the traceback)"
        ) from e
    if not isinstance(out, Mapping):
        raise CLIError(
            f"{what} {spec!r} must return a dict with keys {', '.join(required)}; got {type(out).__name__}"
        )
    for k in out:
        if k not in ENTRY_KEYS:
            raise CLIError(f"{what} {spec!r} returned unknown key {k!r}; allowed: {', '.join(ENTRY_KEYS)}")
    for k in required:
        if k not in out:
            raise CLIError(
                f"{what} {spec!r} returned no {k!r} (it must return {', '.join(required)}; "
                "optionally loss_fn, module)"
            )
    for k in ("apply_fn", "eval_fn", "loss_fn"):
        if k in out and not callable(out[k]):
            raise CLIError(f"{what} {spec!r}: {k!r} must be callable, got {type(out[k]).__name__}")
    b = out.get("batches")
    if b is not None and not (callable(b) or isinstance(b, (list, tuple))):
        raise CLIError(
            f"{what} {spec!r}: 'batches' must be a zero-argument callable or a list of (x, y), "
            f"got {type(b).__name__}"
        )
    if not qjax.rules.leaves_with_paths(out["params"]):
        raise CLIError(f"{what} {spec!r}: 'params' has no array leaves")
    m = out.get("module")
    if m is not None:
        import flax.linen as nn

        if not isinstance(m, nn.Module):
            raise CLIError(f"{what} {spec!r}: 'module' must be a flax.linen Module, got {type(m).__name__}")
    return dict(out)

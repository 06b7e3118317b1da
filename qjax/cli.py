"""The ``qjax`` command.

* ``qjax demo [--fast] [--out DIR] [--seed N] [--quiet]``: a small float CNN trained on
  scikit-learn's bundled 8x8 digits, then the whole toolbox (PTQ, W8A8 integer execution,
  QAT, pruning and shrinking, fixed point, distillation, mixed-precision search) in one
  table: accuracy, bytes, CPU latency vs float, time per step; ``--out`` adds
  ``report.md``, ``results.json`` and PNG plots (``qjax._demo_run``, ``qjax._report``).
* ``qjax compress --config FILE``: the same steps on a user's model named by a JSON/TOML
  config (``qjax._compress``).
* ``qjax bench``: the benchmark scripts of ``experiments/`` that apply on this machine
  (``qjax._bench``).

Mistakes in how the command is called print one line to stderr and exit non-zero;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Sequence

from qjax import _demo
from qjax._bench import add_bench_parser
from qjax._cli_common import CLIError, first_line, prepare_out, seed_arg
from qjax._compress import add_compress_parser
from qjax._demo_run import NOTE, run_demo
from qjax._report import format_report, format_table, write_plots


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors raise :class:`CLIError` (one line)."""

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)")


# -- the demo ---------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    out = prepare_out(args.out)  # check before the long run
    try:
        result = run_demo(fast=args.fast, seed=args.seed, quiet=args.quiet)
    except _demo.MissingDependency as e:
        raise CLIError(str(e)) from None
    print(NOTE)
    print(format_table(result))
    if out is not None:
        try:
            (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
            (out / "report.md").write_text(format_report(result))
            plots = write_plots(result, out)
        except OSError as e:
            raise CLIError(f"--out {args.out}: cannot write results ({e.strerror or e})") from None
        if not args.quiet:
            extra = f" and {len(plots)} PNG plots" if plots else " (no plots: matplotlib is not installed)"
            print(f"wrote {out / 'report.md'}, {out / 'results.json'}{extra}")
    return 0


# -- command line -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``qjax`` argument parser (subcommands: ``demo``)."""
    parser = _Parser(prog="qjax", description="qjax: compress and accelerate neural networks in JAX.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train a small CNN on digits and compare every compression method",
        description=(
            "Train a small float CNN on scikit-learn's bundled 8x8 digits, then compare post-training "
            "weight quantization and quantization-aware fine-tuning of its kernels: accuracy, bytes "
            "held and time per method. " + NOTE
        ),
    )
    demo.add_argument(
        "--fast", action="store_true", help="fewer training epochs and timing repeats (a quick check)"
    )
    demo.add_argument("--out", metavar="DIR", help="write report.md and results.json to DIR")
    demo.add_argument("--seed", type=seed_arg, default=0, metavar="N", help="random seed (default 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress output; print only the results")
    demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    demo.set_defaults(handler=_cmd_demo)
    add_compress_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qjax`` command; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        return args.handler(args)
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    except CLIError as e:
        if debug:
            traceback.print_exc()
        print(f"qjax: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qjax: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that closed early (`qjax bench --list | head`)
        # point stdout at /dev/null so the interpreter's final flush does not fail again
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a process ended by SIGPIPE
    except Exception as e:
        if debug:
            raise
        first = first_line(e)
        print(
            f"qjax: internal error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())

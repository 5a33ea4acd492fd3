"""Command line: ``python -m distscale <command> ...``.

Commands (argparse subcommands, one function each, so more can be added):

* ``plot METRICS.jsonl [-o OUT.png] [--window N] [--title T]``: draw a metrics file
  (:func:`distscale.plot.plot_metrics`), print the image's path and a one-line summary.

Errors about the input (missing or malformed file, nothing to plot) are one line on stderr and exit
code 2, like argparse's own usage errors; a missing optional dependency exits with 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _plot(args: argparse.Namespace) -> int:
    from distscale.plot import plot_metrics, read_metrics, skipped_flag

    if not args.metrics.is_file():
        print(f"distscale plot: error: metrics file not found: {args.metrics}", file=sys.stderr)
        return 2
    try:
        records = read_metrics(args.metrics)
    except (ValueError, OSError) as err:
        print(f"distscale plot: error: {err}", file=sys.stderr)
        return 2
    if not records:
        print(f"distscale plot: error: {args.metrics} has no step records", file=sys.stderr)
        return 2
    out = args.output if args.output is not None else args.metrics.with_suffix(".png")
    try:
        out = plot_metrics(records, out, window=args.window, title=args.title)
    except ImportError as err:
        print(f"distscale plot: error: {err}", file=sys.stderr)
        return 1
    skipped = sum(bool(skipped_flag(r)) for r in records)
    scale = records[-1].get("scale")
    scale_text = f"{scale:g}" if isinstance(scale, int | float) else "not recorded"
    print(out)
    print(
        f"{len(records)} steps ({records[0]['step']}..{records[-1]['step']}), "
        f"{skipped} skipped ({skipped / len(records):.1%}), final scale {scale_text}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m distscale`` parser; each subcommand sets ``func``."""
    parser = argparse.ArgumentParser(prog="python -m distscale", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plot = commands.add_parser(
        "plot",
        help="draw scale, loss, grad norm and overflow rate from a metrics JSON-lines file",
        description="Draw a metrics JSON-lines file (launch/train.py --metrics, JsonlSink) as a PNG.",
    )
    plot.add_argument("metrics", type=Path, help="the JSON-lines metrics file")
    plot.add_argument(
        "-o", "--output", type=Path, default=None, help="image to write (default: METRICS with suffix .png)"
    )
    plot.add_argument(
        "--window", type=_positive_int, default=50, help="steps per overflow-rate window (default: 50)"
    )
    plot.add_argument("--title", default=None, help="figure title (default: the number of steps)")
    plot.set_defaults(func=_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

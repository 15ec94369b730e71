"""The ``pcb-fast`` command line."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .checks import check_ratio


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pcb-fast", description="Fast, faithful PCB-Merging and baselines.")
    parser.add_argument("--version", action="version", version=f"pcb_fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="merge synthetic fine-tuned models and check against the reference")
    demo.add_argument("--models", type=int, default=8, help="number of fine-tuned models (default 8)")
    demo.add_argument("--ratio", type=float, default=0.1, help="PCB keep ratio, 0 < r <= 1 (default 0.1)")
    demo.add_argument("--no-check", action="store_true", help="skip the comparison with the reference path")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            if args.models < 1:
                raise ValueError(f"--models={args.models}: at least one fine-tuned model is needed")
            check_ratio(args.ratio)
            return demo_main(n=args.models, ratio=args.ratio, check=not args.no_check)
    except ValueError as e:
        print(f"pcb-fast: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

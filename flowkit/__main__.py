"""Command line: ``python -m flowkit demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowkit", description="flowkit command line")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build, run, optimize and deploy the demo image pipeline")
    demo.add_argument("--requests", type=int, default=200, help="requests per latency measurement")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        demo_main(args.requests)
    return 0


if __name__ == "__main__":
    sys.exit(main())

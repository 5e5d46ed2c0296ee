"""The ``bgnorm`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bgnorm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("reproduce", help="run the reproduction suite (coming soon)")
    args, _ = parser.parse_known_args(argv)
    if args.command == "reproduce":
        print("bgnorm reproduce: the reproduction suite is coming soon (see the README).")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())

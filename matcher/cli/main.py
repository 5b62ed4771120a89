"""``python -m matcher`` (or ``matcher``): every stage of the pipeline from the command line.

Anything the app shows can be computed here too: encode a gallery, search it, evaluate matchers,
compare them side by side, analyse their errors, train the models.
"""
from __future__ import annotations

import argparse
import logging
import sys

from matcher.cli import dashboard, fine, hashing, index, search, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m matcher", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (search, dashboard, train, hashing, fine, index):
        commands.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()

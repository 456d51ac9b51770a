"""`python3 -m blockmerge.gittheta install [--repo DIR]`: set a repository up (see `install`)."""

from __future__ import annotations

import argparse
import sys

from ..errors import BlockmergeError
from .filter import foreign_type_note
from .install import install


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m blockmerge.gittheta")
    commands = parser.add_subparsers(dest="command", required=True)
    setup = commands.add_parser("install", help="configure a repository's git-theta filter, merge driver and hook")
    setup.add_argument("--repo", default=".", help="the repository (default: the current one)")
    args = parser.parse_args()
    try:
        repo = install(args.repo)
    except BlockmergeError as err:
        print(f"blockmerge: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"blockmerge: {repo.root} uses blockmerge's git-theta filter, merge driver and merge-message hook")
    note = foreign_type_note()
    if note:
        print(f"blockmerge: note: {note}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""``python -m cyphonic.testbed``: look at and clean up test-bed namespaces.

    python -m cyphonic.testbed list [--prefix P]   # test-bed namespaces, by prefix
    python -m cyphonic.testbed down --prefix P     # remove everything named P-* (make lab-down)

``down`` is for ``make lab-down`` and for the leftovers of a crashed run: it ends the processes
running inside the ``P-*`` namespaces (by PID), deletes the namespaces (and so their veths and
bridges) and their ``/etc/netns/P-*`` directories.  Exit status 0 on success, 1 on failure.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from cyphonic.testbed.topology import (
    PREFIX_RE,
    TopologyError,
    check_prefix,
    destroy_prefix,
    list_namespaces,
    pids_in_namespaces,
)


def _prefix(text: str) -> str:
    try:
        return check_prefix(text)
    except TopologyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _list(prefix: str | None) -> int:
    groups: dict[str, list[str]] = {}
    for ns in list_namespaces():
        head, sep, _ = ns.partition("-")
        if sep and PREFIX_RE.fullmatch(head) and prefix in (None, head):
            groups.setdefault(head, []).append(ns)
    for head, names in sorted(groups.items()):
        processes = len(pids_in_namespaces(names))
        print(f"{head}\t{len(names)} namespaces\t{processes} processes\t{' '.join(sorted(names))}")
    return 0


def _down(prefix: str) -> int:
    removed = destroy_prefix(prefix)
    print(f"removed {len(removed)} namespaces" + (f": {' '.join(removed)}" if removed else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cyphonic.testbed",
        description="Look at and clean up test-bed network namespaces.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every command")
    sub = parser.add_subparsers(dest="command", required=True)
    lister = sub.add_parser("list", help="list test-bed namespaces grouped by prefix")
    lister.add_argument("--prefix", type=_prefix, help="only this prefix")
    down = sub.add_parser("down", help="remove every namespace named PREFIX-* and its processes")
    down.add_argument("--prefix", type=_prefix, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "list":
            return _list(args.prefix)
        return _down(args.prefix)
    except TopologyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

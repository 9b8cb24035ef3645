"""The ``teachreg`` command line: ``teachreg data list|fetch|verify|page``.

Each command group adds its subcommands in its own ``_add_*`` function; a subcommand sets
``func`` (called with the parsed arguments, returns the exit status).
"""

from __future__ import annotations

import argparse
import sys

from teachreg import data


def _data_list(args: argparse.Namespace) -> int:
    rows = [("dataset", "files", "size", "cached", "licence")]
    for d in data.manifest().values():
        cached = "yes" if data.is_cached(d.name) else "no"
        rows.append((d.name, str(len(d.files)), f"{d.size / 2**20:.1f} MiB", cached, d.license))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    print(f"\ncache: {data.data_dir()}")
    return 0


def _data_fetch(args: argparse.Namespace) -> int:
    for name in args.names or list(data.manifest()):
        paths = data.fetch(name, progressbar=True)
        print(f"{name}: {len(paths)} files in {data.data_dir()}")
    return 0


def _data_verify(args: argparse.Namespace) -> int:
    bad = data.verify(args.names or None)
    for path in bad:
        print(f"BAD {path}")
    if bad:
        print(f"{len(bad)} cached file(s) do not match their SHA-256; "
              "`teachreg data fetch` downloads them again.")
        return 1
    print(f"all cached files match their SHA-256 ({data.data_dir()})")
    return 0


def _data_page(args: argparse.Namespace) -> int:
    sys.stdout.write(data.manifest_markdown())
    return 0


def _add_data(commands: argparse._SubParsersAction) -> None:
    group = commands.add_parser("data", help="list, download and check the course's datasets")
    sub = group.add_subparsers(dest="data_command", required=True)
    sub.add_parser("list", help="datasets, sizes, licences, whether cached").set_defaults(
        func=_data_list
    )
    fetch = sub.add_parser("fetch", help="download datasets (default: all) into the cache")
    fetch.add_argument("names", nargs="*", metavar="NAME", help="dataset name")
    fetch.set_defaults(func=_data_fetch)
    verify = sub.add_parser("verify", help="re-hash cached files; exit 1 if any is bad")
    verify.add_argument("names", nargs="*", metavar="NAME", help="dataset name")
    verify.set_defaults(func=_data_verify)
    sub.add_parser("page", help="print the book's data page (Markdown)").set_defaults(
        func=_data_page
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with all command groups."""
    parser = argparse.ArgumentParser(prog="teachreg", description="teachreg course tools")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_data(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 with a message on a DataError)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except data.DataError as err:
        print(f"teachreg: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

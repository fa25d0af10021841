"""The command line every benchmark shares: counts that must be positive, `--quick`, the ratio line.

`--quick` takes the fewest runs/items that still go through the real measurement code and print
the ratio line: a check that the bench works on this machine (CI runs each bench so), not a
figure to quote. An explicit count wins over `--quick`.
"""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive count")
    return value


class BenchArgs:
    def __init__(self, doc: str, **parser_kw) -> None:
        parser_kw.setdefault("description", doc.splitlines()[0])
        self.parser = argparse.ArgumentParser(**parser_kw)
        self.parser.add_argument("--quick", action="store_true",
                                 help="fewest runs/items: checks that the bench works, measures little")
        self._counts: dict[str, tuple[int, int]] = {}

    def count(self, flag: str, default: int, quick: int, help: str) -> None:
        self._counts[flag.lstrip("-").replace("-", "_")] = (default, quick)
        self.parser.add_argument(flag, type=positive_int, default=None,
                                 help=f"{help} (default {default}, with --quick {quick})")

    def add_argument(self, *args, **kw) -> None:
        self.parser.add_argument(*args, **kw)

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        args = self.parser.parse_args(argv)
        for dest, (default, quick) in self._counts.items():
            if getattr(args, dest) is None:
                setattr(args, dest, quick if args.quick else default)
        return args


def print_ratio(what: str, value: float, note: str = "") -> None:
    """The bench's headline, one line in a form tests and people can find: `ratio <what>: <x>x  <note>`."""
    print(f"ratio {what}: {value:.2f}x" + (f"  ({note})" if note else ""), flush=True)


def exit_status(left: list[str]) -> int:
    """The bench's exit status: 1, saying what, when it left anything behind (removed by then), else 0."""
    if left:
        print(f"the bench left things behind (removed now): {left}", file=sys.stderr)
        return 1
    return 0

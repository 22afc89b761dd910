"""The --smoke flag every benchmark has: its own code paths at tiny sizes, a few seconds, so that
tests/e2e/test_benchmarks.py runs each one and no benchmark can rot unnoticed."""
import argparse
from collections.abc import Sequence
from typing import Any


def parse_args(parser: argparse.ArgumentParser, smoke_defaults: dict[str, Any],
               argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The parsed arguments, with `smoke_defaults` as the defaults when --smoke is given (flags given explicitly
    still win: `--smoke --saves 3` saves three times)."""
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, a few seconds, the same code paths (tests/e2e/test_benchmarks.py runs it)")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**smoke_defaults)
    return parser.parse_args(argv)

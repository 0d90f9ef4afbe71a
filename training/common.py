"""Errors and entry-point plumbing shared by the zoo's command-line tools."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UsageError(Exception):
    """A mistake in the command line or the inputs: printed as one line, no traceback."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a CLI `main`, turning a `UsageError` (or a config's `ValueError`) into one `error:` line and exit 2."""
    try:
        main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

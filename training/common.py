"""Errors and entry-point plumbing shared by the zoo's command-line tools."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

# huggingface_hub logs every retry of an unreachable Hub (five warnings per file, with the URL); the CLI's own
# `error:` line says what failed and what to pass instead.
HUB_RETRY_LOGGER = "huggingface_hub.utils._http"


class UsageError(Exception):
    """A mistake in the command line or the inputs: printed as one line, no traceback."""


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a CLI `main`, turning a `UsageError` (or a config's `ValueError`) into one `error:` line and exit 2.
    The Hub client's retry warnings are silenced (an offline machine would print a wall of them)."""
    logging.getLogger(HUB_RETRY_LOGGER).setLevel(logging.ERROR)
    try:
        main(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)

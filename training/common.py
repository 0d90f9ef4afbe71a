"""Errors and entry-point plumbing shared by the zoo's command-line tools."""

from __future__ import annotations

import logging
import platform
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# huggingface_hub logs every retry of an unreachable Hub (five warnings per file, with the URL); the CLI's own
# `error:` line says what failed and what to pass instead.
HUB_RETRY_LOGGER = "huggingface_hub.utils._http"


def cpu_name() -> str:
    """The CPU's model name (from `/proc/cpuinfo` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What `device` is, in words: the GPU's name or the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


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

"""User-facing errors: the command-line entry points print these as one line and exit non-zero."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (config, data, paths). The message names the bad thing and what is allowed."""


class ConfigError(UserError):
    """An invalid config key or value."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run a command-line `main`, turning a `UserError` into one line on stderr and exit code 2."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)

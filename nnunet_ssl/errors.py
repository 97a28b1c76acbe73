"""One-line user errors.

nnU-Net's own command line (``nnUNetv2_train``) runs our trainers, so we cannot catch exceptions in a ``main``
of ours there. ``SSLInputError`` derives from ``SystemExit``: when nobody catches it, Python prints only the
message (no traceback) and exits with status 1, which is the one clear line we promise for bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class SSLInputError(SystemExit):
    """Bad user input. The message names the problem and the fix, on one line."""

    def __init__(self, message: str) -> None:
        self.message = " ".join(str(message).split())
        super().__init__(f"nnunet-ssl: error: {self.message}")

    def __str__(self) -> str:
        return self.message


def exit_code_of(command: Callable[[], object]) -> int:
    """Runs a command of ours: 0 on success; on SSLInputError prints its one line to stderr (after flushing the
    progress output) and returns 2, the usual exit status for bad command-line input."""
    try:
        command()
    except SSLInputError as e:
        sys.stdout.flush()
        print(f"nnunet-ssl: error: {e.message}", file=sys.stderr)
        return 2
    return 0

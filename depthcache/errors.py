"""The exception types for user-facing failures: the CLI prints their message, never a traceback."""

from __future__ import annotations

import signal


class DepthcacheError(Exception):
    """A problem the user can fix (bad input, wrong store, missing model); the message says how."""


class CorruptData(DepthcacheError, ValueError):
    """Stored bytes that fail to decode or their checksum, named by store, array and tokens (a ValueError, as zarr's
    own decoding errors are, so code that looks for every bad chunk on a ValueError still does)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP stopped a command at a safe point; the message says what was kept and how to
    continue."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

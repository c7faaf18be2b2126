"""The one exception type for user-facing failures: the CLI prints its message, never a traceback."""


class DepthcacheError(Exception):
    """A problem the user can fix (bad input, wrong store, missing model); the message says how."""

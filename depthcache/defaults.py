"""Defaults shared by the command line and the library, in a module that imports nothing (``--help`` stays fast)."""

DEFAULT_MODEL = "smollm2-135m"

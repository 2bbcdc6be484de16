"""Stand-in submodule."""

from . import __getattr__  # noqa: F401

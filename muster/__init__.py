"""The `muster` command: one entry point that gathers every process's commands."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("muster")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

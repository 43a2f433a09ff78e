"""The `muster` command: one entry point that gathers every process's commands."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("muster")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

# Every process logs the same way; `muster agent run`'s daemon sets it up without the CLI.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

"""Where a storage target's secrets come from, resolved in this one place, on the node.

A plan names credentials by reference (`broker.plan.CredentialRef`) and never holds them.
Every source yields the variables under the names the `swift` and `aws` tools use (OS_*, ST_*,
AWS_*); the backends only ever read those names:

* `file`: an env-style file of `NAME=value` lines (blank lines and `#` comments ignored, an
  optional leading `export `, values optionally in matching quotes). It is refused unless only
  its owner may read it (mode 600 or stricter), since whoever reads it can read, or delete,
  every backup.
* `env_prefix`: the same names with the prefix put in front, a `_` added if the prefix lacks
  one: `MUSTER_PROD` reads `MUSTER_PROD_OS_AUTH_URL`, `MUSTER_PROD_AWS_ACCESS_KEY_ID`...
  Prepending (rather than replacing OS_/AWS_) keeps each variable recognisable and lets one
  prefix hold both a Swift and an S3 set. With both `file` and `env_prefix`, the prefixed
  variables override the file's entries.
* neither: the process environment, exactly as the `swift` and `aws` tools would read it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from broker.plan import CredentialRef

from .base import ConfigError

FAMILIES = ("OS_", "ST_", "AWS_")  # the variable names storage backends understand


class CredentialsError(ConfigError):
    """Credentials are missing, unreadable or stored insecurely."""


@dataclass(frozen=True)
class Credentials:
    """Resolved variables plus a description of their source, for error messages.

    `explicit` is false for the process environment: a backend may then let its library look
    further (say, boto3's ~/.aws/credentials), which it must not do for a named source.
    """

    values: Mapping[str, str]
    source: str
    explicit: bool

    def get(self, *names: str) -> str | None:
        """The first of `names` that is set to a non-empty value."""
        return next((self.values[name] for name in names if self.values.get(name)), None)

    def require(self, *names: str) -> str:
        """Like get, but a missing value is an error saying which variable to set, and where."""
        value = self.get(*names)
        if value is None:
            raise CredentialsError(f"set {' or '.join(names)} in {self.source}")
        return value

    def __repr__(self) -> str:
        return f"Credentials({sorted(self.values)} from {self.source})"  # names, never values


def resolve(ref: CredentialRef, environ: Mapping[str, str] | None = None) -> Credentials:
    """The credentials `ref` points to (see the module docstring for the rules)."""
    environ = os.environ if environ is None else environ
    if ref.file is None and ref.env_prefix is None:
        values = {name: value for name, value in environ.items() if name.startswith(FAMILIES)}
        return Credentials(values, "the environment", explicit=False)
    values: dict[str, str] = {}
    sources: list[str] = []
    if ref.file is not None:
        values.update(read_env_file(Path(ref.file)))
        sources.append(ref.file)
    if ref.env_prefix is not None:
        prefix = ref.env_prefix if ref.env_prefix.endswith("_") else ref.env_prefix + "_"
        values.update(
            (name.removeprefix(prefix), value)
            for name, value in environ.items()
            if name.startswith(prefix)
        )
        sources.append(f"environment variables {prefix}*")
    return Credentials(values, " or ".join(sources), explicit=True)


def read_env_file(path: Path) -> dict[str, str]:
    """Parse a `NAME=value` file that only its owner can read."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise CredentialsError(f"credentials file {path} is not a regular file")
        if info.st_mode & 0o077:
            raise CredentialsError(
                f"credentials file {path} is accessible to group or others "
                f"(mode {stat.S_IMODE(info.st_mode):03o}); run: chmod 600 {path}"
            )
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CredentialsError(
            f"cannot read credentials file {path}: {error.strerror}; check the path and "
            "that the agent's user owns it"
        ) from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.removeprefix("export ").partition("=")
        name = name.strip()
        if not equals or not name.isidentifier():
            # the line itself may hold a secret, so only its number is shown
            raise CredentialsError(f"{path} line {number}: expected NAME=value")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values

"""Where backups go: one small `Storage` interface over a local directory, Swift and S3.

`open_storage(target)` turns a plan's storage target into a `Storage`; `parse_repo_url`
turns the command line's `file:///dir`, `swift://container/prefix` or `s3://bucket/prefix`
into such a target. A URL may add target fields as query parameters: `region`, `endpoint`,
`proxy`, and the credential references `credentials` (a file) and `env_prefix`. Secrets
themselves never go into a URL. Adding a backend means one module implementing
`base.Storage`, one branch in `open_storage`, and its target model in `broker.plan`.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import TypeAdapter, ValidationError

from broker.plan import StorageTarget

from . import credentials
from .base import (
    AuthError,
    ConfigError,
    InvalidName,
    NotFound,
    ObjectInfo,
    Storage,
    StorageError,
    Tuning,
    Unavailable,
)
from .local import LocalStorage

__all__ = [
    "AuthError",
    "ConfigError",
    "InvalidName",
    "NotFound",
    "ObjectInfo",
    "Storage",
    "StorageError",
    "Tuning",
    "Unavailable",
    "open_storage",
    "parse_repo_url",
]

_TARGET: TypeAdapter[StorageTarget] = TypeAdapter(StorageTarget)
_FIELDS = {"region", "endpoint", "proxy"}
_CREDENTIAL_FIELDS = {"credentials": "file", "env_prefix": "env_prefix"}


def open_storage(target: StorageTarget, tuning: Tuning | None = None) -> Storage:
    """The storage a plan's target names, with its credentials resolved on this node."""
    tuning = tuning or Tuning()
    if target.kind == "local":
        return LocalStorage(target, tuning)
    found = credentials.resolve(target.credentials)
    # Imported here: boto3 and swiftclient cost half a second that most commands never need.
    if target.kind == "swift":
        from . import swift

        return swift.SwiftStorage(target, swift.settings(target, found), tuning)
    from . import s3

    return s3.S3Storage(target, s3.settings(target, found), tuning)


def parse_repo_url(url: str) -> StorageTarget:
    """`file:///dir`, `swift://container/prefix` or `s3://bucket/prefix[?region=...]`."""
    parts = urlsplit(url)
    path = unquote(parts.path)
    shown = parts._replace(query="").geturl()  # a proxy parameter may hold a password
    fields: dict[str, object] = {}
    refs: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if key in _FIELDS:
            fields[key] = value
        elif key in _CREDENTIAL_FIELDS:
            refs[_CREDENTIAL_FIELDS[key]] = value
        else:
            allowed = ", ".join(sorted(_FIELDS | set(_CREDENTIAL_FIELDS)))
            raise ConfigError(f"unknown parameter {key!r} in {shown!r}; allowed: {allowed}")
    if refs:
        fields["credentials"] = refs
    if "@" in parts.netloc:
        raise ConfigError(
            "credentials never go into a repository URL: use ?credentials=FILE or ?env_prefix="
        )
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{shown!r}: a file URL names a local path, as in file:///srv/backup")
        fields.update(kind="local", path=path)
    elif parts.scheme in ("swift", "s3"):
        if not parts.netloc or ":" in parts.netloc:
            raise ConfigError(f"{shown!r}: expected {parts.scheme}://NAME/PREFIX")
        place = "container" if parts.scheme == "swift" else "bucket"
        fields.update(kind=parts.scheme, prefix=path, **{place: unquote(parts.netloc)})
    else:
        raise ConfigError(
            f"unsupported repository URL {shown!r}: use file:///DIR, swift://CONTAINER/PREFIX "
            "or s3://BUCKET/PREFIX"
        )
    try:
        return _TARGET.validate_python(fields)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'][1:])) or 'url'}: {e['msg']}" for e in error.errors()
        )
        raise ConfigError(f"invalid repository URL {shown!r}: {problems}") from None

"""`muster keys generate`: the node's age identity, which every backup is encrypted to.

Only the public recipient is ever shown; the identity stays in its 0600 file.
"""

from __future__ import annotations

from pathlib import Path

from agent import age


def generate_identity(path: Path) -> age.Recipient:
    """Write a new identity to `path` (mode 0600, never over an existing file, parent
    directories created private) and return its public recipient."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise age.AgeError(f"{path} already exists; refusing to overwrite an identity")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = age.Identity.generate()
    age.write_identity(path, identity)
    return identity.recipient

"""Canonical JSON: the bytes that are hashed and signed.

Keys sorted, no insignificant whitespace, UTF-8 without escapes. Plans hold only strings,
integers, booleans, lists and objects (durations and sizes are whole numbers), so this
coincides with RFC 8785 for every plan and any language can reproduce it.
"""

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()

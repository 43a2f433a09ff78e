"""Evaluate a rule's `match` against a node's facts, and say why.

Every condition returns an `Explanation`: whether it holds and a sentence a person can
check against the facts ("hostname 'web-3' matches 'web-*'", "no address in 10.1.0.0/16
(addresses: 10.0.0.5/24)"). Combinators carry their parts' explanations, so `muster
rules explain` shows the whole tree. The engine uses the very same evaluation, so what
`explain` says is what the engine does. Nothing short-circuits: an explanation is
complete even where the answer was known early.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Any

from broker.messages import Facts
from broker.rules import CloudMatch, Match, OsMatch


@dataclass(frozen=True)
class Explanation:
    matched: bool
    reason: str
    children: tuple[Explanation, ...] = ()

    def lines(self, indent: str = "  ", depth: int = 0) -> list[str]:
        mark = "✓" if self.matched else "✗"
        lines = [f"{indent * depth}{mark} {self.reason}"]
        for child in self.children:
            lines += child.lines(indent, depth + 1)
        return lines

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"matched": self.matched, "reason": self.reason}
        if self.children:
            data["children"] = [child.to_dict() for child in self.children]
        return data


def evaluate(match: Match, facts: Facts) -> Explanation:
    if match.everything:
        return Explanation(True, "match: all (every node)")
    conditions = list(_conditions(match, facts))
    if len(conditions) == 1:
        return conditions[0]
    return _all(conditions, explicit=False)


def matches(match: Match, facts: Facts) -> bool:
    return evaluate(match, facts).matched


def _conditions(match: Match, facts: Facts) -> list[Explanation]:
    found = []
    if match.hostname is not None:
        found.append(_globs("hostname", facts.hostname.lower(), match.hostname))
    if match.hostname_regex is not None:
        found.append(_regexes("hostname", facts.hostname, match.hostname_regex))
    if match.fqdn is not None:
        found.append(_globs("fqdn", facts.fqdn.lower(), match.fqdn))
    if match.fqdn_regex is not None:
        found.append(_regexes("fqdn", facts.fqdn, match.fqdn_regex))
    if match.subnet is not None:
        found.append(_subnet(facts.addresses, match.subnet))
    if match.os is not None:
        found += _fields("os", facts.os.model_dump(), match.os)
    if match.cloud is not None:
        found += _fields("cloud", facts.cloud.model_dump(), match.cloud)
    if match.labels is not None:
        found += _mapping("label ", "labels", facts.labels, match.labels)
    if match.all is not None:
        found.append(_all([evaluate(part, facts) for part in match.all], explicit=True))
    if match.any is not None:
        found.append(_any([evaluate(part, facts) for part in match.any]))
    if match.not_ is not None:
        inner = evaluate(match.not_, facts)
        reason = "not: the condition does not hold" if not inner.matched else "not: it holds"
        found.append(Explanation(not inner.matched, reason, (inner,)))
    return found


def _all(parts: Sequence[Explanation], explicit: bool) -> Explanation:
    """Every part must hold: an explicit `all:` or the keys of one match mapping."""
    failed, count = sum(not part.matched for part in parts), len(parts)
    conditions = f"{count} condition{'s' * (count != 1)}"
    if failed:
        reason = f"{failed} of {conditions} fail{'s' * (failed == 1 and count == 1)}"
    else:
        reason = f"{'' if explicit else 'all '}{conditions} hold{'s' * (count == 1)}"
    return Explanation(not failed, f"all: {reason}" if explicit else reason, tuple(parts))


def _any(parts: Sequence[Explanation]) -> Explanation:
    held = sum(part.matched for part in parts)
    if held:
        reason = f"any: {held} of {len(parts)} conditions hold"
    else:
        reason = f"any: none of {len(parts)} conditions holds" if len(parts) > 1 else "any: fails"
    return Explanation(held > 0, reason, tuple(parts))


def _quoted(patterns: Sequence[str]) -> str:
    return ", ".join(repr(pattern) for pattern in patterns)


def _globs(what: str, value: str | None, patterns: Sequence[str]) -> Explanation:
    if value is None:
        return Explanation(False, f"{what} is not set (wanted {_quoted(patterns)})")
    for pattern in patterns:
        if fnmatchcase(value, pattern):
            among = f" (one of {_quoted(patterns)})" if len(patterns) > 1 else ""
            return Explanation(True, f"{what} {value!r} matches {pattern!r}{among}")
    if len(patterns) == 1:
        return Explanation(False, f"{what} {value!r} does not match {patterns[0]!r}")
    return Explanation(False, f"{what} {value!r} matches none of {_quoted(patterns)}")


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern, re.IGNORECASE)  # host names compare case-insensitively


def _regexes(what: str, value: str, patterns: Sequence[str]) -> Explanation:
    for pattern in patterns:
        if _compiled(pattern).search(value):
            return Explanation(True, f"{what} {value!r} matches regex '{pattern}'")
    if len(patterns) == 1:
        return Explanation(False, f"{what} {value!r} does not match regex '{patterns[0]}'")
    listed = ", ".join(f"'{pattern}'" for pattern in patterns)
    return Explanation(False, f"{what} {value!r} matches none of the regexes {listed}")


def _subnet(addresses: Sequence[str], networks: Sequence[str]) -> Explanation:
    wanted = " or ".join(networks)
    parsed = [ipaddress.ip_network(network) for network in networks]
    for address in addresses:
        try:
            ip = ipaddress.ip_interface(address).ip
        except ValueError:
            continue  # not an address: it cannot be in any subnet
        for network in parsed:
            if ip.version == network.version and ip in network:
                return Explanation(True, f"address {address} is in {network}")
    listed = ", ".join(addresses) or "none"
    return Explanation(False, f"no address in {wanted} (addresses: {listed})")


def _fields(group: str, facts: Mapping[str, Any], condition: OsMatch | CloudMatch) -> list:
    found = []
    for name in type(condition).model_fields:
        patterns = getattr(condition, name)
        if patterns is None:
            continue
        if name == "metadata":
            metadata = facts.get("metadata") or {}
            found += _mapping(f"{group}.metadata.", "metadata", metadata, patterns)
        else:
            found.append(_globs(f"{group}.{name}", facts.get(name), patterns))
    return found


def _mapping(
    prefix: str, noun: str, values: Mapping[str, str], wanted: Mapping[str, list[str]]
) -> list:
    """Key/value facts (labels, cloud metadata): each key must be set and match."""
    found = []
    for key, patterns in wanted.items():
        if key in values:
            found.append(_globs(f"{prefix}{key}", values[key], patterns))
        else:
            present = ", ".join(sorted(values)) or "none"
            reason = f"{prefix}{key} is not set ({noun}: {present})"
            found.append(Explanation(False, reason))
    return found

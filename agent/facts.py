"""What a node says about itself: host names, addresses, OS, cloud metadata, labels.

Nothing here needs a new dependency or root. Addresses come from `ip -j addr` when iproute2
is installed, else from the kernel directly (`SIOCGIFADDR`/`SIOCGIFNETMASK` per interface for
IPv4, /proc/net/if_inet6 for IPv6). Cloud metadata comes from the first source that answers:
cloud-init's instance-data.json, an OpenStack config drive, then the metadata service (with a
short timeout, since off-cloud nothing answers there). Only a few named fields and the
instance's own `meta` key/values are kept: metadata services also hand out admin passwords,
SSH keys and random seeds, and none of that ever leaves the node.

Each source has a pure parser (`parse_os_release`, `parse_ip_json`, `parse_instance_data`,
`parse_openstack_meta`) that the unit tests feed with fixtures.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import shlex
import shutil
import socket
import struct
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.messages import CloudFacts, Facts, OsFacts

log = logging.getLogger(__name__)

OS_RELEASE_FILES = (Path("/etc/os-release"), Path("/usr/lib/os-release"))
# Families a rule usually means; an ID_LIKE list names the family after the distribution.
KNOWN_FAMILIES = ("debian", "rhel", "suse", "arch", "alpine", "gentoo", "fedora")
_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B
_MAX_METADATA_BYTES = 1 << 20
_MAX_META_VALUE = 255


@dataclass(frozen=True)
class FactSources:
    """Where facts come from; the defaults are the real places, tests point them at fixtures."""

    labels: Mapping[str, str] = field(default_factory=dict)
    cloud_init_path: Path | None = Path("/run/cloud-init/instance-data.json")
    config_drive_path: Path | None = Path("/mnt/config")
    metadata_url: str | None = None
    metadata_timeout: float = 2.0
    os_release: tuple[Path, ...] = OS_RELEASE_FILES
    ip_command: str | None = "ip"  # None: skip iproute2 and ask the kernel directly
    proc_if_inet6: Path = Path("/proc/net/if_inet6")


def collect(sources: FactSources) -> Facts:
    """Gather every fact once. Never raises: a source that fails is logged and left out."""
    hostname = socket.gethostname()
    fqdn = socket.getfqdn()
    if not fqdn or fqdn.startswith("localhost"):  # no resolvable name: the host name says more
        fqdn = hostname
    return Facts(
        hostname=hostname.split(".")[0],
        fqdn=fqdn,
        addresses=_safely(lambda: addresses(sources), []),
        os=_safely(lambda: os_facts(sources.os_release), OsFacts()),
        cloud=_safely(lambda: cloud_facts(sources), CloudFacts()),
        labels=dict(sources.labels),
    )


def _safely(gather: Any, fallback: Any) -> Any:
    try:
        return gather()
    except Exception as error:  # facts are best effort: an odd host must not stop the agent
        log.warning("could not gather facts: %s", error, exc_info=log.isEnabledFor(logging.DEBUG))
        return fallback


# -- OS ----------------------------------------------------------------------------------


def parse_os_release(text: str) -> dict[str, str]:
    """os-release's KEY=value lines; values are shell words (quoted, escaped)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        try:
            words = shlex.split(value)
        except ValueError:  # an unbalanced quote: keep the text as it is
            words = [value.strip()]
        # shlex leaves `\$` and `\`` escaped inside double quotes; os-release does not
        values[key.strip()] = " ".join(words).replace("\\$", "$").replace("\\`", "`")
    return values


def os_from_release(release: Mapping[str, str], kernel: str = "") -> OsFacts:
    """family: the ID when it is a family itself (debian, rhel...), else the first ID_LIKE
    (ubuntu -> debian, rocky -> rhel), else the ID."""
    ident = release.get("ID", "").lower()
    like = release.get("ID_LIKE", "").lower().split()
    if ident in KNOWN_FAMILIES and ident != "fedora":
        family = ident
    elif like:
        family = next((f for f in like if f in KNOWN_FAMILIES), like[0])
    else:
        family = ident
    return OsFacts(
        family=family,
        name=release.get("NAME", ""),
        version=release.get("VERSION_ID", ""),
        kernel=kernel,
    )


def os_facts(files: tuple[Path, ...] = OS_RELEASE_FILES) -> OsFacts:
    kernel = os.uname().release
    for path in files:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            return os_from_release(parse_os_release(path.read_text()), kernel)
    return OsFacts(kernel=kernel)


# -- addresses ---------------------------------------------------------------------------


def parse_ip_json(text: str) -> list[str]:
    """`ip -j addr` output -> addresses in CIDR form, in interface order. Loopback and
    link-local addresses (scope host/link) say nothing about where a node lives: left out."""
    found: list[str] = []
    for interface in json.loads(text or "[]"):
        if "LOOPBACK" in interface.get("flags", []):
            continue
        for info in interface.get("addr_info", []):
            if info.get("scope") in ("host", "link") or "local" not in info:
                continue
            cidr = f"{info['local']}/{info['prefixlen']}"
            if _worth_keeping(cidr) and cidr not in found:
                found.append(cidr)
    return found


def parse_if_inet6(text: str) -> list[str]:
    """/proc/net/if_inet6: address (32 hex digits), ifindex, prefix length (hex), scope..."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 6:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(parts[0]))
        cidr = f"{address.compressed}/{int(parts[2], 16)}"
        if _worth_keeping(cidr) and cidr not in found:
            found.append(cidr)
    return found


def _worth_keeping(cidr: str) -> bool:
    address = ipaddress.ip_interface(cidr).ip
    return not (address.is_loopback or address.is_link_local or address.is_unspecified)


def addresses(sources: FactSources) -> list[str]:
    command = shutil.which(sources.ip_command) if sources.ip_command else None
    if command:
        try:
            result = subprocess.run(
                [command, "-j", "addr", "show"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            )
            return parse_ip_json(result.stdout)
        except (OSError, subprocess.SubprocessError, ValueError) as error:
            log.debug("ip -j addr failed (%s); asking the kernel directly", error)
    found = _ipv4_from_kernel()
    with contextlib.suppress(OSError):
        found += parse_if_inet6(sources.proc_if_inet6.read_text())
    return found


def _ipv4_from_kernel() -> list[str]:
    """One address per interface (the primary one): enough for rules to match a subnet."""
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                address = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)[20:24]
                netmask = fcntl.ioctl(sock.fileno(), _SIOCGIFNETMASK, request)[20:24]
            except OSError:  # no IPv4 address on this interface
                continue
            prefix = bin(int.from_bytes(netmask, "big")).count("1")
            cidr = f"{socket.inet_ntoa(address)}/{prefix}"
            if _worth_keeping(cidr) and cidr not in found:
                found.append(cidr)
    return found


# -- cloud -------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _meta(values: Any) -> dict[str, str]:
    """The instance's own key/values (Nova `meta`): strings, bounded."""
    if not isinstance(values, dict):
        return {}
    return {
        str(key)[:_MAX_META_VALUE]: str(value)[:_MAX_META_VALUE]
        for key, value in values.items()
        if isinstance(value, str | int | float | bool)
    }


def parse_openstack_meta(data: Mapping[str, Any]) -> CloudFacts:
    """OpenStack's meta_data.json (config drive or metadata service). Nova names neither
    image nor flavor there; instance metadata keys `image`/`flavor` fill them when set."""
    meta = _meta(data.get("meta"))
    return CloudFacts(
        provider="openstack",
        project=_text(data.get("project_id")),
        availability_zone=_text(data.get("availability_zone")),
        instance_id=_text(data.get("uuid")),
        image=meta.get("image"),
        flavor=meta.get("flavor"),
        metadata=meta,
    )


def parse_instance_data(data: Mapping[str, Any]) -> CloudFacts:
    """cloud-init's /run/cloud-init/instance-data.json: the standard `v1` keys, and for
    OpenStack the datasource's meta_data (project, `meta`) and EC2-style extras (flavor)."""
    v1 = data.get("v1") or {}
    ds = data.get("ds") or {}
    meta_data = ds.get("meta_data") or {}
    ec2 = ds.get("ec2_metadata") or {}
    provider = _text(v1.get("cloud_name") or v1.get("cloud-name") or v1.get("platform"))
    if provider == "unknown":
        provider = None
    facts = parse_openstack_meta(meta_data) if isinstance(meta_data, dict) and meta_data else None
    facts = facts or CloudFacts()
    return CloudFacts(
        provider=provider or facts.provider,
        project=facts.project,
        availability_zone=_text(v1.get("availability_zone") or v1.get("availability-zone"))
        or facts.availability_zone,
        instance_id=_text(v1.get("instance_id") or v1.get("instance-id")) or facts.instance_id,
        image=facts.image or _text(ec2.get("ami-id")),
        flavor=facts.flavor or _text(ec2.get("instance-type") or v1.get("instance_type")),
        metadata=facts.metadata,
    )


def _read_json(path: Path) -> Any:
    with path.open("rb") as stream:
        return json.loads(stream.read(_MAX_METADATA_BYTES))


def cloud_facts(sources: FactSources) -> CloudFacts:
    if sources.cloud_init_path is not None and sources.cloud_init_path.is_file():
        try:
            facts = parse_instance_data(_read_json(sources.cloud_init_path))
            if facts.provider or facts.instance_id:
                return facts
        except (OSError, ValueError, AttributeError) as error:
            log.warning("cannot read %s: %s", sources.cloud_init_path, error)
    drive = sources.config_drive_path
    if drive is not None:
        path = drive if drive.is_file() else drive / "openstack" / "latest" / "meta_data.json"
        if path.is_file():
            try:
                return parse_openstack_meta(_read_json(path))
            except (OSError, ValueError, AttributeError) as error:
                log.warning("cannot read config drive %s: %s", path, error)
    if sources.metadata_url:
        return metadata_service(sources.metadata_url, sources.metadata_timeout)
    return CloudFacts()


def metadata_service(url: str, timeout: float) -> CloudFacts:
    """The metadata service, once, with a short timeout; off-cloud this simply fails."""
    import urllib.request  # with http.client and email: only where a metadata URL is set

    # An explicit empty proxy map: the link-local service must never go through a proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return parse_openstack_meta(json.loads(response.read(_MAX_METADATA_BYTES)))
    except (OSError, ValueError, AttributeError) as error:
        log.debug("no metadata service at %s: %s", url, error)
        return CloudFacts()

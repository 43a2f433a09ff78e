"""Repository URLs, credential sources and the settings each backend derives from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.storage import ConfigError, Tuning, open_storage, parse_repo_url, s3, swift
from agent.storage.credentials import CredentialsError, resolve
from agent.storage.local import LocalStorage
from broker.plan import CredentialRef, LocalTarget, S3Target, SwiftTarget

MIB = 1024 * 1024


# -- parse_repo_url ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///srv/backup", LocalTarget(path="/srv/backup")),
        ("file:///srv/my%20backups/", LocalTarget(path="/srv/my backups/")),
        ("swift://backups", SwiftTarget(container="backups")),
        ("swift://backups/web1/etc/", SwiftTarget(container="backups", prefix="web1/etc")),
        ("s3://bucket/host", S3Target(bucket="bucket", prefix="host")),
        (
            "s3://bucket/host?region=eu-west-3&endpoint=https://s3.example.net"
            "&credentials=/etc/muster/s3.env",
            S3Target(
                bucket="bucket",
                prefix="host",
                region="eu-west-3",
                endpoint="https://s3.example.net",
                credentials=CredentialRef(file="/etc/muster/s3.env"),
            ),
        ),
        (
            "swift://c/p?env_prefix=MUSTER_PROD&proxy=http://proxy:3128",
            SwiftTarget(
                container="c",
                prefix="p",
                proxy="http://proxy:3128",
                credentials=CredentialRef(env_prefix="MUSTER_PROD"),
            ),
        ),
    ],
)
def test_parse_repo_url(url: str, expected: object) -> None:
    assert parse_repo_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/srv/backup", "unsupported repository URL"),
        ("ftp://host/dir", "unsupported repository URL"),
        ("file://otherhost/dir", "local path"),
        ("file://", "path"),
        ("swift:///prefix", "swift://NAME/PREFIX"),
        ("s3://bucket:9000/x", "s3://NAME/PREFIX"),
        ("s3://key:secret@bucket/x", "credentials never go into a repository URL"),
        ("s3://bucket/x?colour=blue", "unknown parameter 'colour'"),
        ("swift://c/p?env_prefix=lower", "env_prefix"),
    ],
)
def test_parse_repo_url_refuses(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_repo_url(url)


def test_parse_repo_url_never_echoes_query_parameters() -> None:
    with pytest.raises(ConfigError) as raised:
        parse_repo_url("ftp://host/x?proxy=http://user:hunter2@proxy:3128")
    assert "hunter2" not in str(raised.value)


# -- credential sources ------------------------------------------------------------------


def env_file(tmp_path: Path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "storage.env"
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_file_syntax(tmp_path: Path) -> None:
    path = env_file(
        tmp_path,
        "# Swift\n\nexport OS_AUTH_URL=https://auth.example.net/v3\n"
        "OS_PASSWORD = 'p=ss word'\nOS_USERNAME=\"backup\"\nEMPTY=\n",
    )
    found = resolve(CredentialRef(file=path), environ={"OS_PASSWORD": "from-env"})
    assert dict(found.values) == {
        "OS_AUTH_URL": "https://auth.example.net/v3",
        "OS_PASSWORD": "p=ss word",
        "OS_USERNAME": "backup",
        "EMPTY": "",
    }
    assert found.explicit
    assert found.get("EMPTY", "OS_USERNAME") == "backup"
    assert "p=ss word" not in repr(found)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602])
def test_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = env_file(tmp_path, "AWS_SECRET_ACCESS_KEY=s3cr3t\n", mode)
    with pytest.raises(CredentialsError, match=f"chmod 600 {path}") as raised:
        resolve(CredentialRef(file=path))
    assert "s3cr3t" not in str(raised.value)


def test_malformed_line_is_reported_without_its_content(tmp_path: Path) -> None:
    path = env_file(tmp_path, "OS_USERNAME=backup\nhunter2\n")
    with pytest.raises(CredentialsError, match="line 2: expected NAME=value") as raised:
        resolve(CredentialRef(file=path))
    assert "hunter2" not in str(raised.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read credentials file"):
        resolve(CredentialRef(file=str(tmp_path / "absent.env")))


@pytest.mark.parametrize("prefix", ["MUSTER_PROD", "MUSTER_PROD_"])
def test_env_prefix_is_prepended(prefix: str) -> None:
    environ = {
        "MUSTER_PROD_OS_AUTH_URL": "https://auth",
        "MUSTER_PROD_AWS_ACCESS_KEY_ID": "AKIA",
        "OS_AUTH_URL": "https://other",
        "MUSTER_PRODUCTION_OS_USERNAME": "not-mine",
    }
    found = resolve(CredentialRef(env_prefix=prefix), environ)
    assert dict(found.values) == {"OS_AUTH_URL": "https://auth", "AWS_ACCESS_KEY_ID": "AKIA"}
    assert "MUSTER_PROD_*" in found.source


def test_prefixed_environment_overrides_the_file(tmp_path: Path) -> None:
    path = env_file(tmp_path, "ST_USER=file-user\nST_KEY=file-key\n")
    environ = {"APP_ST_KEY": "env-key"}
    found = resolve(CredentialRef(file=path, env_prefix="APP"), environ)
    assert dict(found.values) == {"ST_USER": "file-user", "ST_KEY": "env-key"}


def test_default_is_the_process_environment() -> None:
    environ = {"OS_AUTH_URL": "https://auth", "AWS_PROFILE": "backup", "HOME": "/root"}
    found = resolve(CredentialRef(), environ)
    assert dict(found.values) == {"OS_AUTH_URL": "https://auth", "AWS_PROFILE": "backup"}
    assert not found.explicit


# -- what the backends make of them ------------------------------------------------------


def creds(**values: str) -> object:
    return resolve(CredentialRef(env_prefix="T"), {f"T_{k}": v for k, v in values.items()})


def test_swift_tempauth() -> None:
    found = creds(ST_AUTH="http://swift:8080/auth/v1.0", ST_USER="test:tester", ST_KEY="testing")
    config = swift.settings(SwiftTarget(container="c"), found)
    assert (config.auth_version, config.auth_url, config.user) == (
        "1",
        "http://swift:8080/auth/v1.0",
        "test:tester",
    )
    assert config.key == "testing"
    assert "testing" not in repr(config)


def test_swift_keystone_v3_is_the_default_without_st_auth() -> None:
    found = creds(
        OS_AUTH_URL="https://auth.cloud.example/v3",
        OS_USERNAME="backup",
        OS_PASSWORD="pw",
        OS_PROJECT_NAME="infra",
        OS_USER_DOMAIN_NAME="ldap",
        OS_REGION_NAME="GRA",
    )
    config = swift.settings(SwiftTarget(container="c", region="SBG"), found)
    assert config.auth_version == "3"
    assert (config.project_name, config.user_domain_name) == ("infra", "ldap")
    assert config.project_domain_name == "Default"
    assert config.region == "SBG"  # the target's region wins over OS_REGION_NAME
    assert config.interface == "public"


def test_swift_v1_through_os_variables_and_endpoint_override() -> None:
    found = creds(OS_AUTH_VERSION="1", OS_AUTH_URL="http://a", OS_USERNAME="u", OS_PASSWORD="p")
    target = SwiftTarget(container="c", endpoint="http://other/auth/v1.0", proxy="http://px:3128")
    config = swift.settings(target, found)
    assert (config.auth_version, config.auth_url, config.key) == (
        "1",
        "http://other/auth/v1.0",
        "p",
    )
    assert config.proxy == "http://px:3128"


@pytest.mark.parametrize(
    ("values", "missing"),
    [
        ({"OS_AUTH_URL": "https://a/v3", "OS_USERNAME": "u", "OS_PASSWORD": "p"}, "PROJECT"),
        ({"OS_AUTH_URL": "https://a/v3", "OS_PROJECT_NAME": "x", "OS_PASSWORD": "p"}, "USERNAME"),
        ({"ST_AUTH": "http://a", "ST_USER": "u"}, "ST_KEY or OS_PASSWORD"),
        ({"OS_AUTH_VERSION": "2", "OS_AUTH_URL": "http://a"}, "use 1 or 3"),
    ],
)
def test_swift_missing_settings_are_named(values: dict[str, str], missing: str) -> None:
    with pytest.raises(ConfigError, match=missing) as raised:
        swift.settings(SwiftTarget(container="c"), creds(**values))
    assert "p" not in str(raised.value).split()


def test_s3_keys_endpoint_and_region() -> None:
    found = creds(
        AWS_ACCESS_KEY_ID="AKIA", AWS_SECRET_ACCESS_KEY="secret", AWS_ENDPOINT_URL="http://minio"
    )
    config = s3.settings(S3Target(bucket="b"), found)
    assert (config.access_key, config.secret_key) == ("AKIA", "secret")
    assert (config.endpoint, config.region) == ("http://minio", "us-east-1")
    assert "secret" not in repr(config)
    target = S3Target(bucket="b", endpoint="https://s3.example", region="eu-west-3")
    config = s3.settings(target, found)
    assert (config.endpoint, config.region) == ("https://s3.example", "eu-west-3")


def test_s3_named_source_needs_keys_or_profile() -> None:
    with pytest.raises(ConfigError, match="AWS_ACCESS_KEY_ID or AWS_PROFILE"):
        s3.settings(S3Target(bucket="b"), creds(AWS_REGION="eu-west-1"))
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        s3.settings(S3Target(bucket="b"), creds(AWS_ACCESS_KEY_ID="AKIA"))
    config = s3.settings(S3Target(bucket="b"), creds(AWS_PROFILE="backup"))
    assert (config.profile, config.access_key, config.region) == ("backup", None, None)


def test_s3_process_environment_may_defer_to_boto3_chain() -> None:
    config = s3.settings(S3Target(bucket="b"), resolve(CredentialRef(), environ={}))
    assert config.access_key is None


def test_s3_refuses_parts_below_five_mib() -> None:
    target = S3Target(bucket="b", endpoint="http://127.0.0.1:1")
    found = creds(AWS_ACCESS_KEY_ID="AKIA", AWS_SECRET_ACCESS_KEY="secret")
    with pytest.raises(ConfigError, match="at least"):
        s3.S3Storage(target, s3.settings(target, found), Tuning(part_size=MIB))


def test_tuning_is_validated() -> None:
    with pytest.raises(ConfigError):
        Tuning(part_size=0)


def test_open_storage_dispatches_on_kind(tmp_path: Path) -> None:
    storage = open_storage(parse_repo_url(f"file://{tmp_path}/repo"))
    assert isinstance(storage, LocalStorage)
    assert storage.directory == tmp_path / "repo"


def test_each_backend_has_its_own_part_size_unless_one_is_set(tmp_path: Path) -> None:
    """Each backup worker holds two parts: a file needs no 5 MiB upload unit, Swift takes
    segments of any size, S3 needs 5 MiB."""
    target = LocalTarget(path=str(tmp_path))
    assert LocalStorage(target, Tuning())._part_size(None) == MIB
    assert LocalStorage(target, Tuning(part_size=4096))._part_size(None) == 4096
    assert swift.SwiftStorage.part_size == 2 * MIB and s3.S3Storage.part_size == 5 * MIB


def test_a_part_is_sent_from_the_writers_buffer_and_can_be_sent_again() -> None:
    """Network backends stream a part from the buffer itself (no copy of it), and an HTTP
    client retrying a request seeks back to where it started."""
    from agent.storage.base import part_file

    buffer = bytearray(b"0123456789")
    part = part_file(memoryview(buffer)[2:])
    assert part.read(3) == b"234" and part.tell() == 3
    assert part.seek(0) == 0 and part.read() == b"23456789"
    assert part.seek(-2, 2) == 6 and part.read(5) == b"89" and part.read(5) == b""
    part.seek(0)
    buffer[2:4] = b"ab"  # the same memory, not a copy
    assert part.read(4) == b"ab45"

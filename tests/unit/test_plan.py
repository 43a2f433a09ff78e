from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from broker.plan import Job, Plan, Schedule
from tests.examples import plan


def job(**overrides):
    data = {
        "name": "etc",
        "storage": {"kind": "local", "path": "/srv/backup"},
        "sources": {"paths": ["/etc"]},
        "schedule": {"every": "1h"},
    }
    return Job.model_validate({**data, **overrides})


def test_durations_and_sizes_accept_human_forms_and_travel_as_integers():
    parsed = job(
        schedule={"every": "1h30m", "splay": "5m"},
        volume_size="64MiB",
        bandwidth_limit="10MB",
        hooks={"pre": [{"command": ["pg_dump", "-f", "/var/dump"], "timeout": "2m"}]},
    )
    dumped = parsed.model_dump(mode="json")
    assert dumped["schedule"]["every"] == 5400
    assert dumped["schedule"]["splay"] == 300
    assert dumped["volume_size"] == 64 * 1024 * 1024
    assert dumped["bandwidth_limit"] == 10_000_000
    assert dumped["hooks"]["pre"][0]["timeout"] == 120


@pytest.mark.parametrize(
    "schedule",
    [
        {},
        {"cron": "0 2 * * *", "every": 60},
        {"cron": "every day"},
        {"cron": "61 2 * * *"},
        {"every": "soon"},
        {"every": 0},
    ],
)
def test_bad_schedules_are_refused(schedule):
    with pytest.raises(ValidationError):
        Schedule.model_validate(schedule)


@pytest.mark.parametrize(
    "overrides",
    [
        {"name": "Etc Files"},
        {"storage": {"kind": "ftp", "path": "/x"}},
        {"storage": {"kind": "local", "path": "relative/dir"}},
        {"storage": {"kind": "swift"}},
        {"sources": {"paths": []}},
        {"sources": {"paths": ["etc"]}},
        {"recipients": ["age1notakey"]},
        {"compression_level": 40},
        {"storage": {"kind": "s3", "bucket": "b", "credentials": {"env_prefix": "lower"}}},
    ],
)
def test_bad_jobs_are_refused(overrides):
    with pytest.raises(ValidationError):
        job(**overrides)


def test_duplicate_job_names_are_refused():
    with pytest.raises(ValidationError, match="duplicate job names: etc"):
        Plan(node="a", issued=datetime.now(UTC), jobs=[job(), job()])


def test_content_hash_ignores_issue_time_but_not_content():
    first = plan(issued=datetime(2026, 1, 1, tzinfo=UTC))
    later = plan(issued=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(days=3))
    assert first.content_hash() == later.content_hash()
    other = Plan(node="web1", issued=first.issued, jobs=[job()])
    assert other.content_hash() != first.content_hash()
    assert first.content_hash().startswith("sha256:")


def test_no_secret_field_exists_in_a_storage_target():
    storage = job(
        storage={
            "kind": "swift",
            "container": "c",
            "credentials": {"file": "/etc/muster/swift.env"},
        }
    ).storage
    assert set(storage.credentials.model_dump()) == {"file", "env_prefix"}

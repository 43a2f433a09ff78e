"""The rules language: matchers and their explanations, merging, line-numbered errors,
`muster rules check|explain`, the engine's settings and its rules watcher."""

from __future__ import annotations

import json
import os
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.codec import decode, encode
from broker.messages import Announce, Facts, Keepalive
from broker.rules import (
    CLOUD_FIELDS,
    OS_FIELDS,
    CloudMatch,
    Match,
    OsMatch,
    RuleEngineSettings,
    RulesError,
    deep_merge,
    load_rules,
    parse_rules,
)
from muster.cli import cli
from ruleengine.compile import compile_plan, plan_for
from ruleengine.engine import RulesWatcher
from ruleengine.match import evaluate
from tests.examples import RECIPIENT

EXAMPLE = Path(__file__).parents[2] / "examples" / "rules.yaml"

STORAGE = "storage: {kind: local, path: /backups}"


def facts(**overrides) -> Facts:
    data = {
        "hostname": "web-3",
        "fqdn": "web-3.prod.example.org",
        "addresses": ["10.1.2.3/24", "fd00:1::3/64"],
        "os": {"family": "debian", "name": "Debian GNU/Linux", "version": "12.4"},
        "cloud": {
            "provider": "openstack",
            "project": "web",
            "availability_zone": "nova",
            "image": "debian-12-genericcloud",
            "metadata": {"role": "frontend"},
        },
        "labels": {"tier": "frontend", "env": "prod"},
    }
    data.update(overrides)
    return Facts.model_validate(data)


def match(data) -> Match:
    return Match.model_validate(data)


def rules(text: str) -> object:
    return parse_rules(textwrap.dedent(text), "rules.yaml")


def problems(text: str) -> list[str]:
    with pytest.raises(RulesError) as error:
        rules(text)
    return [str(problem) for problem in error.value.problems]


# -- matchers -----------------------------------------------------------------------------


def test_hostname_glob_matches_and_explains():
    yes = evaluate(match({"hostname": "web-*"}), facts())
    assert (yes.matched, yes.reason) == (True, "hostname 'web-3' matches 'web-*'")
    no = evaluate(match({"hostname": "db*"}), facts())
    assert (no.matched, no.reason) == (False, "hostname 'web-3' does not match 'db*'")


def test_hostname_glob_list_and_case():
    assert evaluate(match({"hostname": ["db*", "WEB-?"]}), facts()).reason == (
        "hostname 'web-3' matches 'web-?' (one of 'db*', 'web-?')"
    )
    assert evaluate(match({"hostname": "web-*"}), facts(hostname="WEB-3")).matched
    no = evaluate(match({"hostname": ["db*", "mail*"]}), facts())
    assert no.reason == "hostname 'web-3' matches none of 'db*', 'mail*'"


def test_globs_match_the_whole_value():
    assert not evaluate(match({"hostname": "web"}), facts()).matched
    assert evaluate(match({"hostname": "web-[0-9]"}), facts()).matched


def test_hostname_regex_searches_and_is_anchorable():
    assert evaluate(match({"hostname_regex": "eb-"}), facts()).matched
    anchored = evaluate(match({"hostname_regex": "^db[0-9]+$"}), facts(hostname="db12"))
    assert (anchored.matched, anchored.reason) == (
        True,
        "hostname 'db12' matches regex '^db[0-9]+$'",
    )
    no = evaluate(match({"hostname_regex": "^db[0-9]+$"}), facts(hostname="db12a"))
    assert (no.matched, no.reason) == (False, "hostname 'db12a' does not match regex '^db[0-9]+$'")


def test_fqdn_glob_and_regex():
    assert evaluate(match({"fqdn": "*.prod.example.org"}), facts()).matched
    assert not evaluate(match({"fqdn": "*.dev.example.org"}), facts()).matched
    result = evaluate(match({"fqdn_regex": r"\.prod\."}), facts())
    assert result.reason == r"fqdn 'web-3.prod.example.org' matches regex '\.prod\.'"


def test_subnet_any_address_in_it():
    yes = evaluate(match({"subnet": "10.1.0.0/16"}), facts())
    assert (yes.matched, yes.reason) == (True, "address 10.1.2.3/24 is in 10.1.0.0/16")
    no = evaluate(match({"subnet": "10.2.0.0/16"}), facts())
    assert (no.matched, no.reason) == (
        False,
        "no address in 10.2.0.0/16 (addresses: 10.1.2.3/24, fd00:1::3/64)",
    )


def test_subnet_ipv6_lists_bare_addresses_and_junk():
    assert evaluate(match({"subnet": "fd00:1::/48"}), facts()).matched
    assert evaluate(match({"subnet": ["192.168.0.0/16", "fd00::/8"]}), facts()).matched
    odd = facts(addresses=["not-an-address", "192.168.7.7"])
    assert evaluate(match({"subnet": "192.168.0.0/16"}), odd).matched
    none = evaluate(match({"subnet": "10.0.0.0/8"}), facts(addresses=[]))
    assert none.reason == "no address in 10.0.0.0/8 (addresses: none)"
    assert not none.matched


def test_cloud_fields_globs_and_metadata():
    result = evaluate(
        match({"cloud": {"project": "web", "image": "debian-*", "metadata": {"role": "front*"}}}),
        facts(),
    )
    assert result.matched
    assert [child.reason for child in result.children] == [
        "cloud.project 'web' matches 'web'",
        "cloud.image 'debian-12-genericcloud' matches 'debian-*'",
        "cloud.metadata.role 'frontend' matches 'front*'",
    ]


def test_cloud_missing_facts_match_nothing():
    unset = evaluate(match({"cloud": {"flavor": "*"}}), facts())
    assert (unset.matched, unset.reason) == (False, "cloud.flavor is not set (wanted '*')")
    missing = evaluate(match({"cloud": {"metadata": {"team": "*"}}}), facts())
    assert (missing.matched, missing.reason) == (
        False,
        "cloud.metadata.team is not set (metadata: role)",
    )


def test_os_family_and_version():
    assert evaluate(match({"os": {"family": "debian", "version": "12*"}}), facts()).matched
    no = evaluate(match({"os": {"family": "debian", "version": "11*"}}), facts())
    assert not no.matched
    assert no.reason == "1 of 2 conditions fail"
    assert no.children[1].reason == "os.version '12.4' does not match '11*'"


def test_whole_numbers_are_text_but_floats_and_booleans_must_be_quoted():
    assert evaluate(match({"os": {"version": 12}}), facts(os={"version": "12"})).matched
    assert problems(
        f"""
        rules:
          - name: r
            match: {{os: {{version: 12.10}}}}
            jobs: {{etc: {{sources: {{paths: [/etc]}}, {STORAGE}}}}}
        """
    ) == ["rules.yaml:4:18: rules[0].match.os.version: 12.1 is not text; quote it in YAML "
          "(e.g. '12.10', 'yes')"]  # fmt: skip


def test_labels():
    assert evaluate(match({"labels": {"tier": "frontend", "env": "prod"}}), facts()).matched
    missing = evaluate(match({"labels": {"backup": "off"}}), facts())
    assert (missing.matched, missing.reason) == (
        False,
        "label backup is not set (labels: env, tier)",
    )
    wrong = evaluate(match({"labels": {"tier": "backend"}}), facts())
    assert wrong.reason == "label tier 'frontend' does not match 'backend'"


def test_several_keys_must_all_hold():
    result = evaluate(match({"hostname": "web-*", "subnet": "10.9.0.0/16"}), facts())
    assert not result.matched
    assert result.reason == "1 of 2 conditions fail"
    assert [child.matched for child in result.children] == [True, False]


def test_all_any_not_nest_and_explain():
    condition = match(
        {
            "any": [
                {"hostname": "db*"},
                {"all": [{"labels": {"tier": "frontend"}}, {"not": {"subnet": "10.9.0.0/16"}}]},
            ]
        }
    )
    result = evaluate(condition, facts())
    assert result.matched
    assert result.lines() == [
        "✓ any: 1 of 2 conditions hold",
        "  ✗ hostname 'web-3' does not match 'db*'",
        "  ✓ all: 2 conditions hold",
        "    ✓ label tier 'frontend' matches 'frontend'",
        "    ✓ not: the condition does not hold",
        "      ✗ no address in 10.9.0.0/16 (addresses: 10.1.2.3/24, fd00:1::3/64)",
    ]
    assert evaluate(match({"not": {"hostname": "web-*"}}), facts()).reason == "not: it holds"
    none = evaluate(match({"any": [{"hostname": "a"}, {"hostname": "b"}]}), facts())
    assert (none.matched, none.reason) == (False, "any: none of 2 conditions holds")


def test_explanations_are_json():
    result = evaluate(match({"not": {"hostname": "db*"}}), facts())
    assert result.to_dict() == {
        "matched": True,
        "reason": "not: the condition does not hold",
        "children": [{"matched": False, "reason": "hostname 'web-3' does not match 'db*'"}],
    }


def test_match_all_matches_every_node():
    result = evaluate(match("all"), facts())
    assert (result.matched, result.reason) == (True, "match: all (every node)")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "empty match"),
        (None, "empty match"),
        ({"hostname": None}, "empty match"),
        ("everything", "a match is a mapping of conditions, or the word 'all'"),
        ({"everything": True}, "write `match: all`"),
        ({"all": []}, "at least 1 item"),
        ({"any": []}, "at least 1 item"),
        ({"cloud": {}}, "empty condition"),
        ({"labels": {}}, "at least 1 item"),
        ({"hostname_regex": "db[0-9"}, "not a regular expression"),
        ({"subnet": "10.1.2.3/16"}, "host bits set"),
        ({"subnet": "10.1.0.0/33"}, "not a subnet"),
        ({"hostnam": "x"}, "Extra inputs"),
        ({"os": {"familly": "x"}}, "Extra inputs"),
    ],
)
def test_invalid_matches_are_refused(data, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        match(data)


def test_matchers_cover_every_fact():
    assert set(OsMatch.model_fields) == set(OS_FIELDS)
    assert set(CloudMatch.model_fields) == set(CLOUD_FIELDS)


# -- jobs, defaults and merging -----------------------------------------------------------

LAYERED = f"""
defaults:
  {STORAGE}
  schedule: {{cron: "15 2 * * *", splay: 30m}}
  retention: {{keep_daily: 7, keep_weekly: 4}}
  recipients: [{RECIPIENT}]
  compression_level: 5
rules:
  - name: everyone
    match: all
    jobs:
      etc: {{sources: {{paths: [/etc]}}}}
  - name: databases
    match: {{hostname: "db*"}}
    defaults:
      retention: {{keep_daily: 30}}
      compression_level: 9
    jobs:
      pg:
        sources: {{paths: [/var/backups/pg]}}
        retention: {{keep_monthly: 12}}
        schedule: {{every: 1h}}
        recipients: []
      etc:
        sources: {{paths: [/etc, /usr/local/etc]}}
        schedule: null
"""


def test_defaults_then_rule_defaults_then_the_job():
    ruleset = rules(LAYERED)
    pg = ruleset.rules[1].jobs["pg"]
    assert pg.retention.model_dump() == {
        "keep_last": 0,
        "keep_hourly": 0,
        "keep_daily": 30,  # rule defaults over file defaults
        "keep_weekly": 4,  # file defaults, merged key by key
        "keep_monthly": 12,  # the job's own
        "keep_yearly": 0,
    }
    assert pg.compression_level == 9
    assert pg.recipients == []  # lists replace
    assert (pg.schedule.every, pg.schedule.cron, pg.schedule.splay) == (3600, None, 1800)
    etc = ruleset.rules[0].jobs["etc"]
    assert (etc.compression_level, etc.retention.keep_daily, etc.recipients) == (5, 7, [RECIPIENT])
    assert ruleset.rules[1].jobs["etc"].schedule is None  # null replaces


def test_merge_rules():
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    assert deep_merge({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
    assert deep_merge({"a": {"b": 1}}, {"a": None}) == {"a": None}
    cron = {"schedule": {"cron": "* * * * *", "splay": 5}}
    assert deep_merge(cron, {"schedule": {"every": 60}}) == {"schedule": {"every": 60, "splay": 5}}
    swift = {"storage": {"kind": "swift", "container": "c", "prefix": "p"}}
    assert deep_merge(swift, {"storage": {"kind": "s3", "bucket": "b"}}) == {
        "storage": {"kind": "s3", "bucket": "b"}
    }
    assert deep_merge(swift, {"storage": {"prefix": "q"}})["storage"] == {
        "kind": "swift",
        "container": "c",
        "prefix": "q",
    }
    base = {"a": {"b": [1]}}
    merged = deep_merge(base, {"c": 1})
    merged["a"]["b"].append(2)
    assert base == {"a": {"b": [1]}}  # no sharing with the layers


def test_matching_rules_add_up_and_the_later_rule_wins():
    ruleset = rules(LAYERED)
    web = compile_plan(ruleset, "web-3", facts())
    assert [job.name for job in web.plan.jobs] == ["etc"]
    assert web.plan.jobs[0].sources.paths == ["/etc"]
    db = compile_plan(ruleset, "db1", facts(hostname="db1"))
    assert [job.name for job in db.plan.jobs] == ["etc", "pg"]  # sorted by name
    assert db.plan.job("etc").sources.paths == ["/etc", "/usr/local/etc"]
    assert db.origins == {"etc": "databases", "pg": "databases"}
    assert [(r.job, r.earlier, r.later) for r in db.replacements] == [
        ("etc", "everyone", "databases")
    ]


def test_a_node_matching_nothing_gets_an_empty_plan():
    ruleset = rules(
        f"""
        rules:
          - name: dbs
            match: {{hostname: "db*"}}
            jobs: {{pg: {{sources: {{paths: [/srv]}}, {STORAGE}}}}}
        """
    )
    plan = plan_for(ruleset, "web-3", facts())
    assert (plan.node, plan.jobs) == ("web-3", [])
    assert plan_for(parse_rules("rules: []\n"), "x", facts()).jobs == []


def test_the_plan_hash_depends_on_content_only():
    ruleset = rules(LAYERED)
    first = plan_for(ruleset, "db1", facts(hostname="db1"), datetime(2026, 1, 1, tzinfo=UTC))
    again = plan_for(rules(LAYERED), "db1", facts(hostname="db1"))
    assert first.issued != again.issued
    assert first.content_hash() == again.content_hash()
    changed = rules(LAYERED.replace("keep_monthly: 12", "keep_monthly: 13"))
    assert plan_for(changed, "db1", facts(hostname="db1")).content_hash() != first.content_hash()
    assert (
        plan_for(changed, "web-3", facts()).content_hash()
        == plan_for(ruleset, "web-3", facts()).content_hash()
    )


def test_the_example_file_is_valid_and_does_what_its_comments_say():
    ruleset = load_rules(EXAMPLE)
    assert [rule.name for rule in ruleset.rules] == [
        "everyone",
        "web-frontends",
        "databases",
        "openstack-databases",
        "legacy-debian",
    ]
    web = plan_for(ruleset, "web-3", facts())
    assert [job.name for job in web.jobs] == ["etc", "www"]
    assert web.job("www").schedule.every == 6 * 3600
    assert web.job("etc").storage.kind == "swift"
    db = plan_for(ruleset, "db3", facts(hostname="db3", labels={}, cloud={}))
    pg = db.job("pg")
    assert (pg.retention.keep_daily, pg.retention.keep_weekly, pg.retention.keep_monthly) == (
        30,
        4,
        12,
    )
    assert (pg.bandwidth_limit, pg.full_every, pg.hooks.pre[0].timeout) == (50_000_000, 14, 3600)
    legacy = plan_for(
        ruleset, "old", facts(hostname="old", os={"family": "debian", "version": "11"})
    )
    assert legacy.job("etc").storage.kind == "s3"
    assert legacy.job("etc").schedule is None
    opted_out = facts(
        hostname="old", os={"family": "debian", "version": "11"}, labels={"backup": "off"}
    )
    assert plan_for(ruleset, "old", opted_out).job("etc").storage.kind == "swift"


# -- errors that point at the line --------------------------------------------------------


def test_unknown_keys_are_errors_with_position_and_suggestion():
    assert problems(
        f"""
        defaults:
          {STORAGE}
          retenton: {{keep_daily: 7}}
        rules:
          - name: r
            match: {{hostname: "a*", hostnam: b}}
            jobs:
              etc:
                sources: {{paths: [/etc]}}
                retention: {{keep_dayly: 3}}
        """
    ) == [
        "rules.yaml:4:3: defaults.retenton: unknown key 'retenton'; did you mean 'retention'?",
        "rules.yaml:7:29: rules[0].match.hostnam: unknown key 'hostnam'; did you mean 'hostname'?",
        "rules.yaml:11:21: rules[0].jobs.etc.retention.keep_dayly: unknown key 'keep_dayly'; "
        "did you mean 'keep_daily'?",
    ]


def test_values_are_checked_where_they_are_written():
    assert problems(
        f"""
        defaults:
          {STORAGE}
          compression_level: 40
        rules:
          - name: a
            match: all
            jobs:
              one: {{sources: {{paths: [/one]}}}}
              two: {{sources: {{paths: [relative]}}}}
          - name: b
            match: all
            defaults:
              storage: {{kind: s3}}
            jobs:
              three: {{sources: {{paths: [/three]}}, schedule: {{cron: "every day"}}}}
              four: {{storage: {{kind: swift}}}}
        """
    ) == [
        # reported once, at the defaults, though it breaks every job
        "rules.yaml:4:3: defaults.compression_level: Input should be less than or equal to 19",
        "rules.yaml:10:31: rules[0].jobs.two.sources.paths[0]: String should match pattern '^/'",
        "rules.yaml:14:7: rules[1].defaults.storage: bucket: Field required "
        "(in job 'three' of rule 'b')",
        "rules.yaml:16:54: rules[1].jobs.three.schedule.cron: not a five-field cron expression: "
        "'every day'",
        "rules.yaml:17:7: rules[1].jobs.four: sources: Field required",
        "rules.yaml:17:14: rules[1].jobs.four.storage: container: Field required",
    ]


def test_structure_errors_point_at_the_line():
    assert problems(
        f"""
        rules:
          - name: web
            match: {{}}
            jobs: {{Etc: {{sources: {{paths: [/etc]}}, {STORAGE}}}}}
          - name: web
            match: {{any: [{{subnet: 10.1.2.3/16}}, {{hostname_regex: "db[0-9"}}]}}
            jobs:
              www: {{sources: {{paths: [/a]}}, {STORAGE}}}
              www: {{sources: {{paths: [/b]}}, {STORAGE}}}
            defaults: {{sources: {{paths: [/x]}}}}
          - name: empty
            match: all
            jobs: {{}}
        """
    ) == [
        "rules.yaml:4:5: rules[0].match: empty match: give at least one condition, or `match: all`",
        "rules.yaml:5:12: rules[0].jobs.Etc: invalid name: String should match pattern "
        "'^[a-z0-9][a-z0-9_.-]{0,63}$'",
        "rules.yaml:6:5: rules[1].name: duplicate rule name 'web' (first at line 3)",
        "rules.yaml:7:20: rules[1].match.any[0].subnet: not a subnet: 10.1.2.3/16 has host bits "
        "set (write e.g. 10.1.0.0/16)",
        "rules.yaml:7:43: rules[1].match.any[1].hostname_regex: not a regular expression: "
        "'db[0-9': unterminated character set at position 2",
        "rules.yaml:10:7: duplicate key 'www' (first at line 9)",
        "rules.yaml:11:16: rules[1].defaults.sources: unknown key 'sources': what to back up is "
        "set job by job, not in defaults",
        "rules.yaml:14:5: rules[2].jobs: Dictionary should have at least 1 item after "
        "validation, not 0",
    ]


def test_yaml_syntax_errors_have_a_position():
    errors = problems("rules:\n  - name: a\n    match: {hostname: [x}\n")
    assert len(errors) == 1
    assert errors[0].startswith("rules.yaml:3:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "rules.yaml: empty rules file (write `rules: []` to mean no rules)"),
        ("# only comments\n", "rules.yaml: empty rules file"),
        ("defaults: {}\n", "rules.yaml:1:1: rules: Field required"),
        ("- a\n- b\n", "rules.yaml:1:1: Input should be a valid dictionary"),
        ("rules: {}\n", "rules.yaml:1:1: rules: Input should be a valid list"),
        ("rules: [{name: a, match: all}]\n", "rules.yaml:1:9: rules[0].jobs: Field required"),
        ("rules: []\nextra: 1\n", "rules.yaml:2:1: extra: unknown key 'extra'"),
    ],
)
def test_file_level_errors(text, expected):
    assert problems(text)[0].startswith(expected)


def test_an_unreadable_file_is_a_rules_error(tmp_path):
    with pytest.raises(RulesError, match="cannot read: No such file"):
        load_rules(tmp_path / "absent.yaml")


def test_yaml_anchors_and_merge_keys_work():
    text = textwrap.dedent(
        f"""
        rules:
          - name: a
            match: all
            jobs:
              etc: &base
                sources: {{paths: [/etc]}}
                {STORAGE}
              etc2:
                <<: *base
                compression_level: 7
        """
    )
    loaded = parse_rules(text)
    assert loaded.rules[0].jobs["etc2"].compression_level == 7
    assert loaded.rules[0].jobs["etc2"].sources.paths == ["/etc"]


# -- muster rules check / explain ---------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_rules_check_accepts_the_example():
    result = CliRunner().invoke(cli, ["rules", "check", str(EXAMPLE)])
    assert result.exit_code == 0, result.output
    assert "ok, 5 rules, 5 jobs, revision sha256:" in result.output


def test_rules_check_reports_file_line_column_and_exits_non_zero(tmp_path):
    bad = write(
        tmp_path / "bad.yaml",
        f"""\
        rules:
          - name: r
            match: {{hostnam: x}}
            jobs: {{etc: {{sources: {{paths: [/etc]}}, {STORAGE}}}}}
        """,
    )
    result = CliRunner().invoke(cli, ["rules", "check", str(EXAMPLE), str(bad)])
    assert result.exit_code == 1
    assert f"{bad}:3:13: rules[0].match.hostnam: unknown key 'hostnam'" in result.output
    assert f"{bad}: 1 problem" in result.output
    assert "examples/rules.yaml: ok" in result.output


def facts_file(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "facts.json"
    path.write_text(facts(**overrides).model_dump_json())
    return path


def test_rules_explain_says_what_matched_what_did_not_and_why(tmp_path):
    result = CliRunner().invoke(
        cli, ["rules", "explain", str(EXAMPLE), "--facts", str(facts_file(tmp_path))]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith("node web-3.prod.example.org\n")  # no --node: the fqdn
    assert "✓ rule 'everyone' (line 38) matches: jobs etc\n  ✓ match: all (every node)" in out
    assert "✓ rule 'web-frontends' (line 48) matches: jobs www" in out
    assert "    ✓ hostname 'web-3' matches 'web-*' (one of 'web-*', 'www-*')" in out
    assert "✗ rule 'databases' (line 60) does not match" in out
    assert "    ✗ hostname 'web-3' does not match regex '^db[0-9]+$'" in out
    assert "    ✓ address 10.1.2.3/24 is in 10.1.0.0/16" in out
    assert "    ✗ os.version '12.4' does not match '11*'" in out
    assert "plan sha256:" in out
    assert ": 2 jobs: etc (rule 'everyone'), www (rule 'web-frontends')" in out
    assert "- name: www\n" in out


def test_rules_explain_json_from_an_announce(tmp_path):
    announce = Announce(
        node="db3.example.org",
        facts=facts(hostname="db3", cloud={"project": "prod-x", "metadata": {"role": "db"}}),
        agent_version="0.1.0",
        recipient=RECIPIENT,
    )
    path = tmp_path / "announce.json"
    path.write_bytes(encode(announce))
    result = CliRunner().invoke(
        cli, ["rules", "explain", str(EXAMPLE), "--facts", str(path), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["node"] == data["plan"]["node"] == "db3.example.org"
    assert {rule["name"]: rule["matched"] for rule in data["rules"]} == {
        "everyone": True,
        "web-frontends": True,
        "databases": True,
        "openstack-databases": True,
        "legacy-debian": False,
    }
    assert data["origins"] == {
        "etc": "everyone",
        "pg": "openstack-databases",
        "www": "web-frontends",
    }
    assert data["replaced"] == [
        {"job": "pg", "earlier": "databases", "later": "openstack-databases"}
    ]
    databases = next(rule for rule in data["rules"] if rule["name"] == "databases")
    assert databases["explanation"]["children"][0] == {
        "matched": True,
        "reason": "hostname 'db3' matches regex '^db[0-9]+$'",
    }
    assert data["plan_hash"].startswith("sha256:")


def test_rules_explain_node_option_keepalives_and_bad_facts(tmp_path):
    runner = CliRunner()
    path = facts_file(tmp_path, hostname="mail1")
    result = runner.invoke(
        cli, ["rules", "explain", str(EXAMPLE), "--facts", str(path), "--node", "n1", "--json"]
    )
    assert json.loads(result.output)["plan"]["node"] == "n1"

    keepalive = tmp_path / "keepalive.json"
    keepalive.write_bytes(encode(Keepalive(node="k1", uptime=1, facts=facts())))
    result = runner.invoke(cli, ["rules", "explain", str(EXAMPLE), "--facts", str(keepalive)])
    assert result.exit_code == 0 and result.output.startswith("node k1\n")
    keepalive.write_bytes(encode(Keepalive(node="k1", uptime=1)))
    result = runner.invoke(cli, ["rules", "explain", str(EXAMPLE), "--facts", str(keepalive)])
    assert result.exit_code == 1 and "carries no facts" in result.output

    junk = tmp_path / "junk.json"
    junk.write_text('{"hostname": 3}')
    result = runner.invoke(cli, ["rules", "explain", str(EXAMPLE), "--facts", str(junk)])
    assert result.exit_code == 1
    assert "hostname: Input should be a valid string" in result.output
    assert "fqdn: Field required" in result.output


def test_rules_explain_refuses_an_invalid_rules_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "rules: [{name: a, match: {}, jobs: {}}]\n")
    path = facts_file(tmp_path)
    result = CliRunner().invoke(cli, ["rules", "explain", str(bad), "--facts", str(path)])
    assert result.exit_code == 1
    assert f"{bad}:1:19: rules[0].match: empty match" in result.output


def test_a_node_matching_nothing_is_explained_as_unprotected(tmp_path):
    only_dbs = write(
        tmp_path / "rules.yaml",
        f"""\
        rules:
          - name: dbs
            match: {{hostname: "db*"}}
            jobs: {{pg: {{sources: {{paths: [/srv]}}, {STORAGE}}}}}
        """,
    )
    path = facts_file(tmp_path)
    result = CliRunner().invoke(cli, ["rules", "explain", str(only_dbs), "--facts", str(path)])
    assert result.exit_code == 0
    assert "no jobs; the reporter will flag this node unprotected" in result.output
    assert "jobs: []" in result.output


# -- keepalives carry facts ---------------------------------------------------------------


def test_keepalives_may_carry_facts():
    plain = Keepalive(node="web-3", uptime=5)
    assert decode(encode(plain)).facts is None
    with_facts = Keepalive(node="web-3", uptime=5, plan_hash="sha256:00", facts=facts())
    assert decode(encode(with_facts)).facts == facts()


# -- the engine's settings and its rules watcher ------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    for name in os.environ:
        if name.startswith("MUSTER_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(RuleEngineSettings, "default_file", tmp_path / "absent.yaml")


def test_settings_precedence_and_required_fields(clean_environment, monkeypatch, tmp_path):
    config = tmp_path / "ruleengine.yaml"
    config.write_text("rules: /from/file.yaml\nsigning_key: /k.pem\nreload_interval: 9\n")
    settings = RuleEngineSettings.load(config)
    assert (settings.rules, settings.reload_interval) == (Path("/from/file.yaml"), 9)
    monkeypatch.setenv("MUSTER_RULES", "/from/env.yaml")
    assert RuleEngineSettings.load(config).rules == Path("/from/env.yaml")
    assert RuleEngineSettings.load(config, rules=Path("/flag.yaml")).rules == Path("/flag.yaml")
    monkeypatch.delenv("MUSTER_RULES")
    with pytest.raises(Exception, match="rules: Field required") as error:
        RuleEngineSettings.load()
    assert "signing_key: Field required" in str(error.value)


def test_run_needs_its_settings(clean_environment):
    result = CliRunner().invoke(cli, ["ruleengine", "run"])
    assert result.exit_code != 0
    assert "rules: Field required" in str(result.exception or result.output)


def test_the_watcher_keeps_the_last_good_rules(tmp_path):
    path = write(tmp_path / "rules.yaml", LAYERED)
    watcher = RulesWatcher(path)
    good = watcher.current
    assert watcher.check() is None  # unchanged

    os.utime(path, ns=(1, 1))
    assert watcher.check() is None  # touched, same bytes

    path.write_text("rules: [")
    outcome = watcher.check()
    assert outcome.error is not None and outcome.rules is None
    assert watcher.current is good and watcher.failing is outcome.error
    assert watcher.check(force=True) is None  # the same invalid bytes are reported once

    path.unlink()
    outcome = watcher.check()
    assert "cannot read" in str(outcome.error)
    assert watcher.current is good

    write(path, LAYERED)
    outcome = watcher.check()
    assert outcome.rules is not None and outcome.rules.revision == good.revision
    assert watcher.failing is None

    write(path, LAYERED.replace("compression_level: 9", "compression_level: 8"))
    outcome = watcher.check()
    assert outcome.rules.revision != good.revision
    assert watcher.current is outcome.rules


def test_the_watcher_refuses_to_start_without_good_rules(tmp_path):
    with pytest.raises(RulesError):
        RulesWatcher(write(tmp_path / "rules.yaml", "rules: [{}]\n"))

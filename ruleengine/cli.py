"""`muster rules check|explain` (work on a rules file, no broker needed) and
`muster ruleengine run` (the rule engine process)."""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path
from typing import IO, Any

import click
import yaml
from pydantic import ValidationError

from broker.cli import settings_options
from broker.codec import parse_json, validate
from broker.connection import connect
from broker.errors import ContractError, InvalidMessage
from broker.messages import Announce, Facts, Keepalive
from broker.rules import RuleEngineSettings, RulesError, RuleSet, load_rules
from broker.signing import key_id, load_signing_key
from broker.topology import declare
from ruleengine.compile import Compiled, compile_plan
from ruleengine.engine import RuleEngine, RulesWatcher

log = logging.getLogger(__name__)


# -- muster rules ----------------------------------------------------------------------------


@click.group("rules")
def rules_group() -> None:
    """Check a rules file and explain the plan it gives a node (no broker needed)."""


def _load_or_report(path: Path) -> RuleSet | None:
    """The rules, or None after printing every problem as FILE:LINE:COLUMN: ... on stderr."""
    try:
        return load_rules(path)
    except RulesError as error:
        for problem in error.problems:
            click.echo(str(problem), err=True)
        count = len(error.problems)
        click.echo(f"{path}: {count} problem{'s' * (count != 1)}", err=True)
        return None


@rules_group.command("check")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
def check_command(files: tuple[Path, ...]) -> None:
    """Validate rules FILES: every problem is reported as FILE:LINE:COLUMN: PATH: what.

    Every job of every rule is merged with its defaults and checked as a complete plan
    job, so a file that passes cannot give any node an invalid plan. Exits 1 if any
    file has a problem.
    """
    failed = False
    for path in files:
        rules = _load_or_report(path)
        if rules is None:
            failed = True
            continue
        click.echo(
            f"{path}: ok, {len(rules.rules)} rule{'s' * (len(rules.rules) != 1)}, "
            f"{rules.job_count} job{'s' * (rules.job_count != 1)}, revision {rules.revision[:19]}"
        )
    if failed:
        raise SystemExit(1)


@rules_group.command("explain")
@click.argument("file", type=click.Path(path_type=Path))
@click.option(
    "--facts",
    "facts_file",
    type=click.File("rb"),
    required=True,
    help="JSON: a Facts object, or a whole announce (or keepalive with facts); - for stdin",
)
@click.option("--node", help="node id [default: the message's node, else the fqdn]")
@click.option("--json", "as_json", is_flag=True, help="one JSON object instead of text")
def explain_command(file: Path, facts_file: IO[bytes], node: str | None, as_json: bool) -> None:
    """Show which rules of FILE match a node and why (and which do not, and why not),
    and the plan the rule engine would send it."""
    node_id, facts = read_facts(facts_file, node)
    rules = _load_or_report(file)
    if rules is None:
        raise SystemExit(1)
    compiled = compile_plan(rules, node_id, facts)
    if as_json:
        click.echo(json.dumps(compiled.to_dict(rules), indent=2, ensure_ascii=False))
    else:
        click.echo(render_explanation(compiled, rules))


def read_facts(stream: IO[bytes], node: str | None) -> tuple[str, Facts]:
    name = getattr(stream, "name", "facts")
    try:
        data = parse_json(stream.read())
        if "type" in data:
            message = validate(data)
            if not isinstance(message, Announce | Keepalive):
                raise click.ClickException(f"{name}: a {message.type} message holds no facts")
            if message.facts is None:
                raise click.ClickException(f"{name}: this keepalive carries no facts")
            return node or message.node, message.facts
        facts = Facts.model_validate(data)
    except InvalidMessage as error:
        raise click.ClickException(f"{name}: {error}") from None
    except ValidationError as error:
        raise click.ClickException(
            f"{name}: {InvalidMessage.from_validation('facts', error)}"
        ) from None
    return node or facts.fqdn, facts


def render_explanation(compiled: Compiled, rules: RuleSet) -> str:
    plan = compiled.plan
    lines = [f"node {plan.node}", f"rules {rules.source} (revision {rules.revision[:19]})", ""]
    for outcome in compiled.outcomes:
        rule = outcome.rule
        jobs = ", ".join(sorted(rule.jobs))
        if outcome.matched:
            head = f"✓ rule {rule.name!r} (line {rule.line}) matches: jobs {jobs}"
        else:
            head = f"✗ rule {rule.name!r} (line {rule.line}) does not match"
        lines.append(head)
        lines += outcome.explanation.lines(depth=1)
    if not compiled.outcomes:
        lines.append("(the file has no rules)")
    if compiled.replacements:
        lines.append("")
    for replaced in compiled.replacements:
        lines.append(
            f"job {replaced.job!r}: rule {replaced.later!r} replaces rule "
            f"{replaced.earlier!r} (the later rule wins)"
        )
    lines.append("")
    if plan.jobs:
        origins = ", ".join(f"{job} (rule {rule!r})" for job, rule in compiled.origins.items())
        lines.append(f"plan {plan.content_hash()}: {len(plan.jobs)} jobs: {origins}")
    else:
        lines.append(
            f"plan {plan.content_hash()}: no jobs; the reporter will flag this node unprotected"
        )
    document = plan.model_dump(mode="json")
    lines.append(yaml.safe_dump(document, sort_keys=False, allow_unicode=True).rstrip())
    return "\n".join(lines)


# -- muster ruleengine -----------------------------------------------------------------------


@click.group("ruleengine")
def ruleengine_group() -> None:
    """The rule engine process: facts in, signed plans out."""


def engine_options(command: Any) -> Any:
    """--rules and --signing-key, for every command that runs a rule engine (`muster up`)."""
    command = click.option(
        "--signing-key",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Ed25519 plan-signing key, PEM [env MUSTER_SIGNING_KEY]",
    )(command)
    return click.option(
        "--rules",
        type=click.Path(dir_okay=False, path_type=Path),
        help="the rules file [env MUSTER_RULES]",
    )(command)


@ruleengine_group.command("run")
@engine_options
@settings_options
def run_command(
    rules: Path | None, signing_key: Path | None, config_file: Path | None, broker_url: str | None
) -> None:
    """Answer announces and keepalives on muster.ruleengine with signed plans.

    Stateless: run several, they share the queue. The rules file is reloaded when it
    changes and on SIGHUP; an invalid file is refused (the last good rules stay in
    force) and raises a rules_invalid alert. SIGTERM or Ctrl-C stop it.
    """
    settings = RuleEngineSettings.load(
        config_file, broker_url=broker_url, rules=rules, signing_key=signing_key
    )
    try:
        key = load_signing_key(settings.signing_key)
    except OSError as error:
        message = f"signing key {settings.signing_key}: {error.strerror}"
        raise click.ClickException(message) from None
    except ValueError as error:
        raise ContractError(f"signing key {settings.signing_key}: {error}") from None
    watcher = RulesWatcher(settings.rules)
    connection = connect(settings.broker_urls, settings.heartbeat)
    declare(connection)
    engine = RuleEngine(
        connection,
        watcher,
        key,
        prefetch=settings.prefetch,
        reload_interval=settings.reload_interval,
    )
    install_signal_handlers(engine)
    click.echo(
        f"rule engine {engine.instance}: rules {settings.rules} ({len(watcher.current.rules)} "
        f"rules, revision {watcher.current.revision[:19]}), signing key "
        f"{key_id(key.public_key())}, broker {connection.as_uri()}",
        err=True,
    )
    try:
        engine.run()
    finally:
        connection.release()
    click.echo(f"rule engine {engine.instance} stopped: {dict(engine.counts)}", err=True)


def install_signal_handlers(engine: RuleEngine) -> None:
    def reload(signum: int, frame: Any) -> None:
        engine.request_reload()

    def stop(signum: int, frame: Any) -> None:
        engine.stop()

    signal.signal(signal.SIGHUP, reload)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

"""What every repository command needs (job, node, repository, keys, cache), resolved once.

A command either follows a plan (`--plan FILE`, by default the verified plan the agent daemon
keeps in its state directory) or works ad hoc on a repository URL (`--repo URL`), in which
case a job is built from the command line. Either way it receives a `RepoContext`:

    @click.command("backup")
    @repo_command(sources=True)
    def backup(context: RepoContext) -> None:
        run_backup(context.job, context.repo, context.identity, context.cache, ...)

Every error raised here says what to do next. Keys never appear in messages or logs: only
file names and public recipients do.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import TypeAdapter, ValidationError

from agent import age
from agent.repository import Repository
from agent.state import CatalogCache, JobBusy, default_state_dir
from agent.storage import (
    AuthError,
    ConfigError,
    StorageError,
    open_storage,
    parse_repo_url,
)
from broker.errors import ContractError, InvalidMessage
from broker.messages import SignedPlan
from broker.plan import Job, Plan, Sources, StorageTarget
from broker.types import JobName, NodeId

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
IDENTITY_FILE = "identity.txt"
AD_HOC_JOB = "default"

_NODE_ID: TypeAdapter[str] = TypeAdapter(NodeId)
_JOB_NAME: TypeAdapter[str] = TypeAdapter(JobName)
_NOT_NODE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class CommandError(click.ClickException):
    """A failure shown as one line; exit code 2 when the command cannot start as given
    (options, plan, keys, credentials), 1 when it failed while running."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ContextError(CommandError):
    """The options do not resolve to a repository, a job and keys."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


@dataclass(frozen=True)
class RepoOptions:
    """The shared options as given; None means "not given, use the default"."""

    plan: Path | None = None
    repo: str | None = None
    identity: Path | None = None
    node: str | None = None
    job: str | None = None
    state_dir: Path | None = None
    sources: Sequence[str] = ()  # PATH arguments: ad hoc backups only
    recipients: Sequence[str] = ()  # --recipient: ad hoc backups only


@dataclass(frozen=True)
class RepoContext:
    """One job of one node in one storage target, with the keys and cache to work on it."""

    job: Job
    node: str
    repo: Repository
    identities: list[age.Identity] = field(repr=False)
    cache: CatalogCache
    state_dir: Path
    location: str = ""  # the target as a URL that is safe to show (no query, no secret)
    plan: Plan | None = None  # None for an ad hoc job
    identity_file: Path | None = None

    @property
    def identity(self) -> age.Identity:
        """The node's own key: the first identity of the file."""
        if not self.identities:
            raise ContextError(_missing_identity(self.identity_file or Path(IDENTITY_FILE)))
        return self.identities[0]

    @property
    def name(self) -> str:
        """`<node>/<job>`, as in the repository's layout."""
        return f"{self.node}/{self.job.name}"


# -- resolution ----------------------------------------------------------------------------


def resolve(
    options: RepoOptions, *, sources: bool = False, identity_required: bool = True
) -> RepoContext:
    """Turn the options into a context. `sources`: the command takes PATH arguments (backup);
    `identity_required`: the command encrypts or decrypts, so the identity must exist."""
    state_dir = options.state_dir or default_state_dir()
    if options.repo is not None:
        if options.plan is not None:
            raise ContextError(
                "--plan and --repo exclude each other: follow a plan, or name a repository "
                "for an ad hoc run"
            )
        plan = None
        target = _target(options.repo)
        node = _node(options.node) if options.node else default_node()
        job = ad_hoc_job(target, options.job or AD_HOC_JOB, options.sources, options.recipients)
        if sources and not options.sources:
            raise ContextError(
                "name what to back up: muster backup --repo URL [--identity KEYFILE] PATH..."
            )
    else:
        plan_file = options.plan or state_dir / PLAN_FILE
        if options.plan is None and not plan_file.exists():
            raise ContextError(
                f"no plan at {plan_file}; pass --repo URL --identity KEY, or run "
                "`muster agent run` to receive a plan"
            )
        plan = load_plan(plan_file)
        job = select_job(plan, options.job)
        if options.sources:
            raise ContextError(
                f"PATH arguments are for ad hoc backups with --repo; job {job.name} of the "
                f"plan backs up {', '.join(job.sources.paths)}"
            )
        if options.recipients:
            raise ContextError(
                "--recipient is for ad hoc backups with --repo; a plan's job names its own "
                "recipients"
            )
        node = plan.node
        if options.node and options.node != plan.node:
            raise ContextError(
                f"{plan_file} is the plan for node {plan.node}, not {options.node}: drop "
                "--node, or use --repo URL --node NAME to work on another node's snapshots"
            )
        target = job.storage
    identity_file = options.identity or state_dir / IDENTITY_FILE
    identities = load_keys(identity_file, required=identity_required or bool(options.identity))
    try:
        storage = open_storage(target)
    except (ConfigError, AuthError) as error:
        raise ContextError(str(error)) from None
    return RepoContext(
        job=job,
        node=node,
        repo=Repository(storage, node, job.name),
        identities=identities,
        cache=CatalogCache(state_dir, repository_key(target, node, job.name)),
        state_dir=state_dir,
        location=target_url(target),
        plan=plan,
        identity_file=identity_file,
    )


def load_plan(path: Path) -> Plan:
    """A plan file: a `Plan` in YAML or JSON, or a signed plan message as the broker sends it.

    The signature of a message is not checked here: the agent daemon checks it before it
    writes the plan to its state directory, and a file named with --plan is the operator's
    own configuration, trusted like any other.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise ContextError(f"cannot read plan {path}: {reason}") from None
    data = _parse_document(text, path)
    if not isinstance(data, dict):
        raise ContextError(
            f"{path} holds a {type(data).__name__}, not a plan: expected an object with "
            "node, issued and jobs, or a signed plan message"
        )
    kind = data.get("type")
    try:
        if kind == "plan":
            return SignedPlan.model_validate(data).plan
        if kind is not None:
            raise ContextError(f"{path} holds a {kind!r} message, not a plan")
        return Plan.model_validate(data)
    except ValidationError as error:
        what = f"signed plan message in {path}" if kind else f"plan in {path}"
        raise ContextError(str(InvalidMessage.from_validation(what, error))) from None


def select_job(plan: Plan, name: str | None) -> Job:
    """The job named, else the plan's only job."""
    names = ", ".join(job.name for job in plan.jobs)
    if name is not None:
        try:
            return plan.job(name)
        except KeyError:
            known = f"its jobs: {names}" if names else "it has no jobs"
            raise ContextError(f"the plan for {plan.node} has no job {name!r}; {known}") from None
    if len(plan.jobs) == 1:
        return plan.jobs[0]
    if not plan.jobs:
        raise ContextError(
            f"the plan for {plan.node} has no jobs; use --repo URL for an ad hoc backup"
        )
    raise ContextError(
        f"the plan for {plan.node} has several jobs ({names}): choose one with --job NAME"
    )


def ad_hoc_job(
    target: StorageTarget, name: str, paths: Sequence[str], recipients: Sequence[str]
) -> Job:
    """A job from the command line. Relative paths are taken from the current directory; a
    job for a command that only reads has no sources."""
    try:
        _JOB_NAME.validate_python(name)
    except ValidationError:
        raise ContextError(
            f"--job {name!r}: a job name is 1 to 64 lower-case letters, digits, '.', '_' or "
            "'-', starting with a letter or digit"
        ) from None
    for text in recipients:
        try:
            age.Recipient.parse(text)
        except age.KeyFormatError as error:
            raise ContextError(f"--recipient {text!r}: {error}") from None
    absolute = list(dict.fromkeys(os.path.abspath(os.path.expanduser(p)) for p in paths))
    try:
        found = Sources(paths=absolute) if absolute else Sources.model_construct(paths=[])
        return Job(name=name, storage=target, sources=found, recipients=list(recipients))
    except ValidationError as error:
        raise ContextError(str(InvalidMessage.from_validation("ad hoc job", error))) from None


def load_keys(path: Path, *, required: bool = True) -> list[age.Identity]:
    """The identities in `path`; an empty list if it is missing and not required."""
    if not path.exists():
        if required:
            raise ContextError(_missing_identity(path))
        return []
    try:
        info = path.stat()
        identities = age.load_identities(path)
    except age.KeyFormatError as error:
        raise ContextError(
            f"{error}; pass --identity with the file `muster keys generate` wrote"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not a text file"
        raise ContextError(f"cannot read identity {path}: {reason}") from None
    if info.st_mode & 0o077:
        log.warning(
            "identity %s is readable by group or others (mode %03o); run: chmod 600 %s",
            path,
            stat.S_IMODE(info.st_mode),
            path,
        )
    return identities


def default_node() -> str:
    """This host's fully qualified name, made into a valid node id."""
    names = [socket.getfqdn(), socket.gethostname()]
    chosen = next((n for n in names if n and not n.startswith("localhost")), names[-1])
    return sanitise_node(chosen)


def sanitise_node(name: str) -> str:
    """Replace what a node id may not hold by '-', and trim it to the allowed shape."""
    cleaned = _NOT_NODE_CHARS.sub("-", name).lstrip("._-")[:253]
    return cleaned or "localhost"


def target_url(target: StorageTarget) -> str:
    """The target as a repository URL, for messages: credentials and proxy left out."""
    if target.kind == "local":
        base = "file://" + target.path.rstrip("/")
        url = base + ("/" + target.prefix if target.prefix else "")
    else:
        place = target.container if target.kind == "swift" else target.bucket
        url = f"{target.kind}://{place}" + ("/" + target.prefix if target.prefix else "")
    extras = [
        f"{key}={value}" for key in ("region", "endpoint") if (value := getattr(target, key, None))
    ]
    return url + ("?" + "&".join(extras) if extras else "")


def repository_key(target: StorageTarget, node: str, job: str) -> str:
    """What names a job's catalog cache: the same place reached by a plan or a URL shares it."""
    return f"{target_url(target)}#{node}/{job}"


# -- click glue ----------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])


def repo_command(*, sources: bool = False, identity_required: bool = True) -> Callable[[F], F]:
    """Add the shared options to a command, which then receives `context: RepoContext`.

    With `sources`, the command also takes PATH arguments and --recipient options, which
    build an ad hoc job's sources and escrow recipients.
    """

    def decorate(command: F) -> F:
        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            options = RepoOptions(
                plan=kwargs.pop("plan_file"),
                repo=kwargs.pop("repo_url"),
                identity=kwargs.pop("identity_file"),
                node=kwargs.pop("node"),
                job=kwargs.pop("job_name"),
                state_dir=kwargs.pop("state_dir"),
                sources=kwargs.pop("paths", ()),
                recipients=kwargs.pop("recipients", ()),
            )
            with reported_errors():
                context = resolve(options, sources=sources, identity_required=identity_required)
                return command(context=context, **kwargs)

        options = [
            click.option(
                "--state-dir",
                type=click.Path(file_okay=False, path_type=Path),
                envvar="MUSTER_STATE_DIR",
                help="the agent's state: plan, identity, catalog cache [env MUSTER_STATE_DIR; "
                "default /var/lib/muster as root, else ~/.local/state/muster]",
            ),
            click.option(
                "--job",
                "job_name",
                metavar="NAME",
                help="the plan's job [default: its only job]; with --repo, the job's name in "
                f"the repository [default: {AD_HOC_JOB}]",
            ),
            click.option(
                "--node",
                metavar="NAME",
                help="the node whose snapshots these are [default: the plan's node, else this "
                "host's FQDN]",
            ),
            click.option(
                "--identity",
                "identity_file",
                type=click.Path(dir_okay=False, path_type=Path),
                metavar="KEYFILE",
                help="age identity file [default: STATE_DIR/identity.txt]; make one with "
                "`muster keys generate KEYFILE`",
            ),
            click.option(
                "--repo",
                "repo_url",
                metavar="URL",
                help="ad hoc repository instead of a plan: file:///DIR, "
                "swift://CONTAINER/PREFIX or s3://BUCKET/PREFIX[?endpoint=URL&region=R]",
            ),
            click.option(
                "--plan",
                "plan_file",
                type=click.Path(exists=True, dir_okay=False, path_type=Path),
                metavar="FILE",
                help="plan as YAML or JSON, or a signed plan message [default: "
                "STATE_DIR/plan.json, kept by `muster agent run`]",
            ),
        ]
        if sources:
            options.insert(
                3,
                click.option(
                    "--recipient",
                    "recipients",
                    multiple=True,
                    metavar="AGE_RECIPIENT",
                    help="with --repo: also encrypt to this age1... recipient (repeatable)",
                ),
            )
            options.append(
                click.argument("paths", nargs=-1, metavar="[PATH]...", type=click.Path(exists=True))
            )
        decorated: Any = wrapper
        for option in options:
            decorated = option(decorated)
        return decorated

    return decorate


@contextlib.contextmanager
def reported_errors() -> Iterator[None]:
    """Turn storage, key and contract errors into one-line messages with an exit code."""
    try:
        yield
    except click.ClickException:
        raise
    except (ConfigError, AuthError, ContractError) as error:
        log.debug("command failed", exc_info=True)
        raise CommandError(str(error), exit_code=2) from None
    except (StorageError, age.AgeError, JobBusy) as error:
        log.debug("command failed", exc_info=True)
        raise CommandError(str(error)) from None
    except OSError as error:
        log.debug("command failed", exc_info=True)
        where = f"{error.filename}: " if error.filename else ""
        raise CommandError(f"{where}{error.strerror or error}") from None


# -- helpers -------------------------------------------------------------------------------


def _target(url: str) -> StorageTarget:
    try:
        return parse_repo_url(url)
    except ConfigError as error:
        raise ContextError(str(error)) from None


def _node(name: str) -> str:
    try:
        return _NODE_ID.validate_python(name)
    except ValidationError:
        raise ContextError(
            f"--node {name!r}: a node id is letters, digits, '.', '_' and '-', starting with "
            "a letter or digit"
        ) from None


def _missing_identity(path: Path) -> str:
    return (
        f"no identity at {path}; create one with `muster keys generate {path}`, or pass "
        "--identity KEYFILE"
    )


def _parse_document(text: str, path: Path) -> Any:
    """JSON, else YAML; YAML's dates become ISO strings, as they would be in JSON."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    import yaml  # here: the daemon's plan.json and ad hoc backups never need it (~20 ms)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ContextError(f"{path} is neither JSON nor YAML: {error}") from None
    try:
        return json.loads(json.dumps(data, default=_iso))
    except (TypeError, ValueError) as error:
        raise ContextError(f"{path}: {error}; a plan holds only JSON data") from None


def _iso(value: Any) -> str:
    if isinstance(value, datetime | date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON data")

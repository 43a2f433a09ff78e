"""The rules file: which nodes get which backup jobs, and the rule engine's settings.

A rules file is YAML kept in git (the language is described in docs/RULES.md):

    defaults: {storage: ..., schedule: ..., retention: ...}   # any Job field but name, sources
    rules:
      - name: databases
        match: {hostname_regex: "^db[0-9]+$", subnet: 10.1.0.0/16}
        defaults: {retention: {keep_daily: 30}}               # this rule's jobs only
        jobs:
          pg: {sources: {paths: [/var/backups/pg]}, hooks: {pre: [{command: pg-dump-all}]}}

Every job is complete once the file is loaded: its fields are the deep merge of the
file's defaults, the rule's defaults and its own, validated as a plan `Job`. So a
loaded `RuleSet` can never produce an invalid plan, and `muster rules check` finds every
mistake a node could ever hit, whatever its facts. Every problem is reported with the
file, line and column it comes from, and unknown keys are errors at every depth: a typo
must not silently drop a retention rule.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import ipaddress
import re
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Union, get_args, get_origin

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from broker.config import MusterSettings
from broker.errors import ContractError
from broker.messages import CloudFacts, OsFacts
from broker.plan import Job
from broker.types import JobName

# -- strict twins of the plan models ---------------------------------------------------------
#
# Plan models accept unknown fields (a newer rule engine may send some). A rules file is
# the opposite: written by people, so an unknown key is a typo. `strict_model` derives a
# twin of a model, and of every model nested in it, that forbids extra fields and keeps
# every type, default and validator of the original.

_strict_models: dict[type[BaseModel], type[BaseModel]] = {}


def strict_model(model: type[BaseModel]) -> type[BaseModel]:
    if model in _strict_models:
        return _strict_models[model]
    base = type(model.__name__, (model,), {"model_config": ConfigDict(extra="forbid")})
    _strict_models[model] = base  # recursive models refer to the base while being built
    fields = {
        name: (strict, info)
        for name, info in model.model_fields.items()
        if (strict := _strict_type(info.annotation)) is not info.annotation
    }
    if fields:
        _strict_models[model] = create_model(model.__name__, __base__=base, **fields)
    return _strict_models[model]


def _strict_type(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return strict_model(annotation)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        inner = _strict_type(args[0])
        return annotation if inner is args[0] else Annotated[(inner, *annotation.__metadata__)]
    if origin in (Union, types.UnionType):
        members = tuple(_strict_type(arg) for arg in args)
        return annotation if members == args else Union[members]  # noqa: UP007
    if origin is list:
        item = _strict_type(args[0])
        return annotation if item is args[0] else list[item]
    if origin is dict:
        value = _strict_type(args[1])
        return annotation if value is args[1] else dict[args[0], value]
    return annotation


StrictJob = strict_model(Job)

# -- matchers ---------------------------------------------------------------------------------


def _one_or_many(value: Any) -> Any:
    """A pattern or a list of them; numbers become text (`version: 12`), but YAML's
    floats and booleans would not round-trip (`12.10` is 12.1, `yes` is true)."""
    items = value if isinstance(value, list) else [value]
    result = []
    for item in items:
        if isinstance(item, bool | float):
            raise ValueError(f"{item!r} is not text; quote it in YAML (e.g. '12.10', 'yes')")
        result.append(str(item) if isinstance(item, int) else item)
    return result


def _valid_regexes(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"not a regular expression: {pattern!r}: {error}") from None
    return patterns


def _valid_networks(networks: list[str]) -> list[str]:
    for network in networks:
        try:
            ipaddress.ip_network(network)
        except ValueError as error:
            raise ValueError(f"not a subnet: {error} (write e.g. 10.1.0.0/16)") from None
    return [str(ipaddress.ip_network(network)) for network in networks]


_NonEmpty = Field(min_length=1)
Globs = Annotated[list[str], BeforeValidator(_one_or_many), _NonEmpty]
"""Shell-style patterns (`*`, `?`, `[...]`); one or a list, any one suffices."""
Regexes = Annotated[list[str], BeforeValidator(_one_or_many), _NonEmpty]
Networks = Annotated[list[str], BeforeValidator(_one_or_many), _NonEmpty]


class _RulesModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _FactsMatch(_RulesModel):
    @model_validator(mode="after")
    def _not_empty(self) -> _FactsMatch:
        if not self.model_fields_set:
            raise ValueError("empty condition: name at least one field to match")
        return self


class OsMatch(_FactsMatch):
    """Globs over `Facts.os`; every field given must match."""

    family: Globs | None = None
    name: Globs | None = None
    version: Globs | None = None
    kernel: Globs | None = None


class CloudMatch(_FactsMatch):
    """Globs over `Facts.cloud`; `metadata` matches the instance's own key/values."""

    provider: Globs | None = None
    project: Globs | None = None
    availability_zone: Globs | None = None
    instance_id: Globs | None = None
    image: Globs | None = None
    flavor: Globs | None = None
    metadata: Annotated[dict[str, Globs], _NonEmpty] | None = None


# The matchers must cover the facts; a unit test holds this in place.
OS_FIELDS = tuple(OsFacts.model_fields)
CLOUD_FIELDS = tuple(CloudFacts.model_fields)


class Match(_RulesModel):
    """A condition over a node's facts. Several keys in one mapping must all hold.
    `match: all` (the word) matches every node; an empty match is an error."""

    everything: bool = Field(default=False, exclude=True)  # spelt `match: all`
    hostname: Globs | None = None
    hostname_regex: Regexes | None = None
    fqdn: Globs | None = None
    fqdn_regex: Regexes | None = None
    subnet: Networks | None = None
    os: OsMatch | None = None
    cloud: CloudMatch | None = None
    labels: Annotated[dict[str, Globs], _NonEmpty] | None = None
    all: Annotated[list[Match], _NonEmpty] | None = None
    any: Annotated[list[Match], _NonEmpty] | None = None
    not_: Match | None = Field(default=None, alias="not")

    @model_validator(mode="before")
    @classmethod
    def _spelling(cls, data: Any) -> Any:
        if data == "all":
            return {"everything": True}
        if data is None or data == {}:
            raise ValueError("empty match: give at least one condition, or `match: all`")
        if isinstance(data, str):
            raise ValueError(f"{data!r}: a match is a mapping of conditions, or the word 'all'")
        if isinstance(data, dict) and "everything" in data:
            raise ValueError("unknown condition 'everything'; write `match: all`")
        return data

    @model_validator(mode="after")
    def _not_empty(self) -> Match:
        if not self.everything and all(
            getattr(self, name) is None for name in type(self).model_fields if name != "everything"
        ):
            raise ValueError("empty match: give at least one condition, or `match: all`")
        return self

    @field_validator("hostname_regex", "fqdn_regex")
    @classmethod
    def _regexes(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _valid_regexes(value)

    @field_validator("subnet")
    @classmethod
    def _networks(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _valid_networks(value)

    @field_validator("hostname", "fqdn")
    @classmethod
    def _host_names_fold_case(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [pattern.lower() for pattern in value]


# -- the file's shape -------------------------------------------------------------------------

# Defaults may set every Job field but these two: a job's name is its key, and what to
# back up only makes sense job by job.
NOT_DEFAULTS = ("name", "sources")
DEFAULT_FIELDS = tuple(name for name in Job.model_fields if name not in NOT_DEFAULTS)

# The layers are checked for their keys here; their values are checked once merged, as a
# complete Job, where a partial value (a defaults' storage without a container) is fine.
JobSettings = create_model(
    "JobSettings",
    __base__=_RulesModel,
    **{name: (Any, None) for name in DEFAULT_FIELDS},
)
JobSpec = create_model("JobSpec", __base__=JobSettings, sources=(Any, None))


class Rule(_RulesModel):
    name: str = Field(min_length=1)
    description: str = ""
    match: Match
    defaults: JobSettings = JobSettings()
    jobs: Annotated[dict[JobName, JobSpec], _NonEmpty]


class RulesFile(_RulesModel):
    defaults: JobSettings = JobSettings()
    rules: list[Rule]


# -- loaded rules -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CompiledRule:
    """A rule with its jobs merged and validated, ready to apply."""

    name: str
    match: Match
    jobs: dict[str, Job]
    line: int = 0
    description: str = ""


@dataclass(frozen=True)
class RuleSet:
    source: str
    revision: str  # "sha256:" + hex digest of the file's bytes
    rules: tuple[CompiledRule, ...]

    @property
    def job_count(self) -> int:
        return sum(len(rule.jobs) for rule in self.rules)


@dataclass(frozen=True, order=True)
class Problem:
    line: int  # 1-based; 0 when unknown
    column: int
    path: str  # rules[2].jobs.pg.retention
    message: str
    source: str = field(default="", compare=False)

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.column}" if self.line else self.source
        what = f"{self.path}: {self.message}" if self.path else self.message
        return f"{where}: {what}"


class RulesError(ContractError):
    """A rules file that cannot be used; `problems` point at file, line and column."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = sorted(set(problems))
        count = len(self.problems)
        lines = "\n".join(str(problem) for problem in self.problems)
        super().__init__(f"{source}: {count} problem{'s' * (count != 1)}\n{lines}")


def revision_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def load_rules(path: Path) -> RuleSet:
    """Read and validate a rules file. Raises RulesError (also for an unreadable file)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        problem = Problem(0, 0, "", f"cannot read: {error.strerror}", str(path))
        raise RulesError(str(path), [problem]) from None
    return parse_rules(data, str(path))


def parse_rules(data: bytes | str, source: str = "<rules>") -> RuleSet:
    raw = data.encode() if isinstance(data, str) else data
    problems: list[Problem] = []
    try:
        root, document, duplicates = _compose(raw)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        message = " ".join(filter(None, [error.context, error.problem]))
        raise RulesError(source, [Problem(line, column, "", message, source)]) from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise RulesError(source, [Problem(0, 0, "", f"not YAML: {error}", source)]) from None
    where = _Locator(root, source)
    problems += [
        Problem(node.start_mark.line + 1, node.start_mark.column + 1, "", message, source)
        for node, message in duplicates
    ]
    if document is None:
        problems.append(where.problem((), "empty rules file (write `rules: []` to mean no rules)"))
        raise RulesError(source, problems)

    model: RulesFile | None = None
    try:
        model = RulesFile.model_validate(document)
    except ValidationError as error:
        problems += [where.validation_problem(item, document) for item in error.errors()]
    problems += _duplicate_rule_names(document, where)
    jobs, job_problems = _merge_jobs(document, where)
    problems += job_problems
    if problems or model is None:
        raise RulesError(source, problems)
    compiled = tuple(
        CompiledRule(
            name=rule.name,
            match=rule.match,
            jobs=jobs[index],
            line=where.line_of(("rules", index)),
            description=rule.description,
        )
        for index, rule in enumerate(model.rules)
    )
    return RuleSet(source=source, revision=revision_of(raw), rules=compiled)


def _duplicate_rule_names(document: Any, where: _Locator) -> list[Problem]:
    """Rule names must be unique: explanations and logs name rules by them."""
    rules = document.get("rules") if isinstance(document, dict) else None
    first: dict[str, int] = {}
    problems = []
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        name = rule.get("name") if isinstance(rule, dict) else None
        if not isinstance(name, str):
            continue
        if name in first:
            line = where.line_of(("rules", first[name], "name"))
            message = f"duplicate rule name {name!r} (first at line {line})"
            problems.append(where.problem(("rules", index, "name"), message))
        first.setdefault(name, index)
    return problems


# -- merging ----------------------------------------------------------------------------------

# Keys that exclude each other: setting one in a later layer drops the other.
_EXCLUSIVE: dict[tuple[str, ...], tuple[str, ...]] = {("schedule",): ("cron", "every")}
# Mappings replaced whole, not merged, when this key changes (swift -> local storage).
_REPLACED_WHEN_CHANGED: dict[tuple[str, ...], str] = {("storage",): "kind"}


def deep_merge(base: Any, override: Any, path: tuple[str, ...] = ()) -> Any:
    """`override` on top of `base`: mappings merge key by key, anything else (lists,
    scalars, null) replaces. See _EXCLUSIVE and _REPLACED_WHEN_CHANGED for the two
    exceptions that keep a merge from mixing incompatible settings."""
    if not (isinstance(base, dict) and isinstance(override, dict)):
        return copy.deepcopy(override)
    kind = _REPLACED_WHEN_CHANGED.get(path)
    if kind and kind in override and base.get(kind) != override[kind]:
        return copy.deepcopy(override)
    result = copy.deepcopy(base)
    exclusive = _EXCLUSIVE.get(path, ())
    if any(key in override for key in exclusive):
        for key in exclusive:
            result.pop(key, None)
    for key, value in override.items():
        if key in result:
            result[key] = deep_merge(result[key], value, (*path, key))
        else:
            result[key] = copy.deepcopy(value)
    return result


def _layer(value: Any, allowed: Sequence[str]) -> dict[str, Any]:
    """The usable part of a layer; its unknown keys are reported by RulesFile already."""
    if not isinstance(value, dict):
        return {}
    return {key: item for key, item in value.items() if key in allowed}


def _merge_jobs(document: Any, where: _Locator) -> tuple[dict[int, dict[str, Job]], list[Problem]]:
    """Merge and validate every job of every rule, however malformed the rest is, so
    that one run of `muster rules check` reports every problem it can."""
    jobs: dict[int, dict[str, Job]] = {}
    problems: list[Problem] = []
    if not isinstance(document, dict):
        return jobs, problems
    defaults = _layer(document.get("defaults"), DEFAULT_FIELDS)
    rules = document.get("rules")
    for index, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, dict):
            continue
        jobs[index] = {}
        rule_defaults = _layer(rule.get("defaults"), DEFAULT_FIELDS)
        specs = rule.get("jobs")
        for name, spec in (specs if isinstance(specs, dict) else {}).items():
            if not isinstance(name, str) or not isinstance(spec, dict):
                continue  # reported by RulesFile
            own = _layer(spec, (*DEFAULT_FIELDS, "sources"))
            merged = deep_merge(deep_merge(defaults, rule_defaults), own)
            merged["name"] = name
            layers = [
                (("rules", index, "jobs", name), own),
                (("rules", index, "defaults"), rule_defaults),
                (("defaults",), defaults),
            ]
            try:
                StrictJob.model_validate(merged)
                jobs[index][name] = Job.model_validate(merged)
            except ValidationError as error:
                for item in error.errors():
                    if item["loc"][:1] != ("name",):  # a bad job name is reported already
                        problems.append(where.job_problem(item, merged, layers, rule, name))
    return jobs, problems


# -- YAML with positions ----------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """A SafeLoader that records duplicate keys (PyYAML silently keeps the last one)."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[yaml.Node, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[str, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            if key_node.value in seen:
                first = seen[key_node.value].start_mark.line + 1
                self.duplicates.append(
                    (key_node, f"duplicate key {key_node.value!r} (first at line {first})")
                )
            seen.setdefault(key_node.value, key_node)
        return super().construct_mapping(node, deep)


def _compose(raw: bytes) -> tuple[yaml.Node | None, Any, list[tuple[yaml.Node, str]]]:
    loader = _Loader(raw)
    try:
        root = loader.get_single_node()
        document = loader.construct_document(root) if root is not None else None
        return root, document, loader.duplicates
    finally:
        loader.dispose()


def _format_path(path: Sequence[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _clean_message(item: dict[str, Any]) -> str:
    message = str(item["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if item["type"] == "extra_forbidden":
        message = "unknown key"
    return message


def _strip_tags(loc: Sequence[Any], data: Any) -> tuple[Any, ...]:
    """Drop what pydantic adds to a location that is not in the document: the tag of a
    discriminated union (storage -> 'swift' -> container) and the '[key]' of a dict key."""
    cleaned = []
    for part in loc:
        if part == "[key]":
            continue
        if isinstance(data, dict):
            if part not in data and data.get("kind") == part:
                continue
            data = data.get(part)
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            data = None
        cleaned.append(part)
    return tuple(cleaned)


class _Locator:
    """Maps a path in the document (('rules', 2, 'jobs', 'pg')) to a line and column."""

    def __init__(self, root: yaml.Node | None, source: str) -> None:
        self.root = root
        self.source = source

    def walk(self, path: Sequence[Any]) -> tuple[int, yaml.Node | None]:
        """How many leading parts of `path` exist, and the node to point at for the last
        of them: a mapping's key (where a person reads the name), or a list item."""
        node, mark_node, depth = self.root, self.root, 0
        for part in path:
            child = key = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in reversed(node.value):  # the last duplicate wins
                    if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                        key, child = key_node, value_node
                        break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(part, int)
                and 0 <= part < len(node.value)
            ):
                key = child = node.value[part]
            if child is None:
                break
            node, mark_node, depth = child, key, depth + 1
        return depth, mark_node

    def position(self, path: Sequence[Any]) -> tuple[int, int]:
        _, node = self.walk(path)
        return (node.start_mark.line + 1, node.start_mark.column + 1) if node else (0, 0)

    def line_of(self, path: Sequence[Any]) -> int:
        return self.position(path)[0]

    def problem(self, path: Sequence[Any], message: str) -> Problem:
        line, column = self.position(path)
        return Problem(line, column, _format_path(path), message, self.source)

    def validation_problem(self, item: dict[str, Any], document: Any) -> Problem:
        path = _strip_tags(item["loc"], document)
        message = _clean_message(item)
        if item["type"] == "extra_forbidden":
            message = _unknown_key(path)
        elif "[key]" in item["loc"]:
            message = f"invalid name: {message}"
        return self.problem(path, message)

    def job_problem(
        self,
        item: dict[str, Any],
        merged: dict[str, Any],
        layers: list[tuple[tuple[Any, ...], dict[str, Any]]],
        rule: dict[str, Any],
        job: str,
    ) -> Problem:
        """Point at the layer the faulty value comes from: the job itself, its rule's
        defaults or the file's defaults, whichever holds most of the path (the most
        specific one on a tie). A missing field points at the job."""
        loc = _strip_tags(item["loc"], merged)
        best_prefix, best_depth = layers[0][0], 0
        for prefix, content in layers:
            if not loc or loc[0] not in content:
                continue
            depth, _ = self.walk((*prefix, *loc))
            depth -= len(prefix)
            if depth > best_depth:
                best_prefix, best_depth = prefix, depth
        found, rest = loc[:best_depth], loc[best_depth:]
        message = _clean_message(item)
        if item["type"] == "extra_forbidden":
            message = _unknown_key(("defaults", *loc))
        if rest:
            message = f"{_format_path(rest)}: {message}"
            if best_prefix is not layers[0][0]:
                message += f" (in job {job!r} of rule {rule.get('name')!r})"
        return self.problem((*best_prefix, *found), message)


def _unknown_key(path: Sequence[Any]) -> str:
    """'unknown key', and the key it probably meant."""
    name = str(path[-1]) if path else ""
    if name == "sources" and "defaults" in path[:-1]:
        return "unknown key 'sources': what to back up is set job by job, not in defaults"
    close = difflib.get_close_matches(name, _known_keys(path[:-1]), n=1, cutoff=0.6)
    return f"unknown key {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")


def _known_keys(parent: Sequence[Any]) -> list[str]:
    """The keys valid at a path of the document, for spelling hints."""
    annotation: Any = RulesFile
    for part in parent:
        annotation = _unwrap(annotation)
        if get_origin(annotation) in (list, dict):  # a list index or a dict key (job name)
            annotation = get_args(annotation)[-1]
            continue
        if annotation in (JobSettings, JobSpec):  # their values are checked as a Job
            annotation = StrictJob
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        fields = {info.alias or name: info for name, info in annotation.model_fields.items()}
        if part not in fields:
            return []
        annotation = fields[part].annotation
    model = _unwrap(annotation)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return []
    return [info.alias or name for name, info in model.model_fields.items() if not info.exclude]


def _unwrap(annotation: Any) -> Any:
    """The type inside Annotated[...] and Optional[...] (a union's first member)."""
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
        elif origin in (Union, types.UnionType):
            annotation = next(a for a in get_args(annotation) if a is not type(None))
        else:
            return annotation


# -- the rule engine's settings ---------------------------------------------------------------


class RuleEngineSettings(MusterSettings):
    """`muster ruleengine run`: flags, then MUSTER_* environment, then
    /etc/muster/ruleengine.yaml (or --config / MUSTER_CONFIG)."""

    default_file: ClassVar[Path] = Path("/etc/muster/ruleengine.yaml")

    rules: Path = Field(description="the rules file, usually a checkout of a git repository")
    signing_key: Path = Field(description="the Ed25519 private key that signs plans (PEM)")
    reload_interval: float = Field(
        default=3.0, gt=0, description="seconds between checks of the rules file for changes"
    )
    prefetch: int = Field(
        default=100,
        ge=1,
        description="unacknowledged messages per engine; confirmed and acknowledged by halves",
    )

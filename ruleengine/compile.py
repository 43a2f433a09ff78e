"""Facts + rules -> plan.

Every rule whose `match` holds contributes its jobs, like Sensu subscriptions: a node
in three rules gets the jobs of all three. When two matching rules define a job of the
same name, the later rule's job replaces the earlier one whole (each job was already
merged with its defaults when the rules were loaded). A node that matches nothing gets
an empty plan, which the reporter flags as unprotected. Jobs are sorted by name, so a
plan's content hash changes only when its content does.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from broker.messages import Facts
from broker.plan import Job, Plan
from broker.rules import CompiledRule, RuleSet
from broker.types import utcnow
from ruleengine.match import Explanation, evaluate


@dataclass(frozen=True)
class RuleOutcome:
    rule: CompiledRule
    explanation: Explanation

    @property
    def matched(self) -> bool:
        return self.explanation.matched


@dataclass(frozen=True)
class Replacement:
    job: str
    earlier: str  # rule names
    later: str


@dataclass(frozen=True)
class Compiled:
    """A plan and how it came about."""

    plan: Plan
    outcomes: tuple[RuleOutcome, ...]
    origins: dict[str, str]  # job name -> the rule it comes from
    replacements: tuple[Replacement, ...]

    def to_dict(self, rules: RuleSet) -> dict[str, Any]:
        """The explanation as JSON (`muster rules explain --json`)."""
        return {
            "node": self.plan.node,
            "rules_file": rules.source,
            "revision": rules.revision,
            "rules": [
                {
                    "name": outcome.rule.name,
                    "line": outcome.rule.line,
                    "matched": outcome.matched,
                    "jobs": sorted(outcome.rule.jobs),
                    "explanation": outcome.explanation.to_dict(),
                }
                for outcome in self.outcomes
            ],
            "origins": self.origins,
            "replaced": [vars(replacement) for replacement in self.replacements],
            "plan_hash": self.plan.content_hash(),
            "plan": self.plan.model_dump(mode="json"),
        }


def compile_plan(
    rules: RuleSet, node: str, facts: Facts, issued: datetime | None = None
) -> Compiled:
    jobs: dict[str, Job] = {}
    origins: dict[str, str] = {}
    outcomes, replacements = [], []
    for rule in rules.rules:
        outcome = RuleOutcome(rule, evaluate(rule.match, facts))
        outcomes.append(outcome)
        if not outcome.matched:
            continue
        for name, job in rule.jobs.items():
            if name in origins:
                replacements.append(Replacement(name, origins[name], rule.name))
            jobs[name] = job
            origins[name] = rule.name
    plan = Plan(
        node=node,
        issued=issued or utcnow(),
        jobs=[jobs[name] for name in sorted(jobs)],
    )
    return Compiled(plan, tuple(outcomes), dict(sorted(origins.items())), tuple(replacements))


def plan_for(rules: RuleSet, node: str, facts: Facts, issued: datetime | None = None) -> Plan:
    return compile_plan(rules, node, facts, issued).plan

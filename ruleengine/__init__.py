"""The rule engine: matches the facts nodes announce against the rules file kept in git,
and answers each node with its signed backup plan. Stateless; run as many as you like.

- `broker.rules`: the rules file (models, loading with line numbers, merging).
- `ruleengine.match`: conditions over facts, each explaining itself.
- `ruleengine.compile`: facts + rules -> plan.
- `ruleengine.engine`: the RabbitMQ consumer behind `muster ruleengine run`.
- `ruleengine.cli`: `muster rules check|explain` and `muster ruleengine run`.
"""

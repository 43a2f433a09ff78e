"""Muster's wire contract: every process takes its message, plan and config types from here.

It holds no process logic; it defines what crosses process boundaries (JSON messages on
RabbitMQ, signed plans, the repository's snapshot records, rules and settings files) so
that agent, rule engine and reporter can never disagree about a shape.
"""

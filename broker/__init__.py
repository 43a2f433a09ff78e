"""Muster's wire contract: every process takes its message, plan and config types from here.

Nothing in this package knows about backups, rules or MongoDB; it only defines what
crosses process boundaries (JSON messages on RabbitMQ, signed plans, config files) so
that agent, rule engine and reporter can never disagree about a shape.
"""

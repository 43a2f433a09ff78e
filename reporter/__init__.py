"""The reporter: results, keepalives and alerts into MongoDB; the watchdog; fleet status.

MongoDB holds history only, never the ability to restore: snapshot history can be
rebuilt from storage at any time (`muster reporter reindex`). Run as many reporters as
you like: they share the `muster.reporter` queue and claim alert changes in MongoDB.

- `reporter.store`: the MongoDB collections, indexes and durable writes.
- `reporter.ingest`: messages to idempotent, coalesced, time-guarded bulk writes (pure).
- `reporter.service`: the consumer behind `muster reporter run`: batches, acks, retries.
- `reporter.watchdog`: keepalive, overdue, restore-test and unprotected alerts.
- `reporter.metrics`: the Prometheus /metrics endpoint.
- `reporter.queries`: `muster status` and `muster report` (aggregation pipelines).
- `reporter.reindex`: `muster reporter reindex`, snapshot history from storage.
- `reporter.cli`: the commands. docs/REPORTER.md describes it all.
"""

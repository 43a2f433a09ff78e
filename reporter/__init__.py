"""The reporter: results and keepalives into MongoDB, fleet status, alerts.

Not built yet (see the Reporter issue); docs/ARCHITECTURE.md describes its queue and the
messages it will consume.
"""

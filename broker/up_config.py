"""`muster up`'s settings: the rule engine's and the reporter's in one file.

`muster up` runs both central processes from one configuration (flag > `MUSTER_*`
environment > /etc/muster/up.yaml > default), so its settings are the union of theirs,
with the same names, environment variables and defaults: a `ruleengine.yaml` and a
`reporter.yaml` merge into an `up.yaml` as they are. The one name both define,
`prefetch`, is the reporter's here; the rule engine keeps its default.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from broker.reporter_config import ReporterSettings
from broker.rules import RuleEngineSettings


class UpSettings(ReporterSettings, RuleEngineSettings):
    """What `muster up` reads: `rules` and `signing_key` are required, as for the rule
    engine; everything else has the reporter's and the rule engine's defaults."""

    default_file: ClassVar[Path] = Path("/etc/muster/up.yaml")

"""The one exception type of the data pipeline.

It subclasses :class:`moe_dist.config.ConfigError`, so the command line reports it the same way
as any other configuration problem: the field (``data.source`` ...), its value and the fix.
"""

from __future__ import annotations

from moe_dist.config import ConfigError


class DataError(ConfigError):
    """A user-facing problem with ``data.*`` settings or the data they point at."""

"""Typed configuration: dataclass sections, YAML loading, dotted overrides, validation.

The package splits one tree over a few files: ``model.py``, ``moe.py`` and ``run.py`` hold the
sections, ``root.py`` the tree, ``loading.py`` YAML and overrides, ``validation.py`` the checks
that need the world size.

A config is one tree, ``Config(model, moe, parallel, data, train, checkpoint, log, zero)``.
Every field documents its meaning and its "disabled" value. Values come from, in increasing
precedence: the dataclass defaults, a YAML file, and ``section.key=value`` overrides from the
command line. Unknown keys and wrong types are errors that name the key and suggest a fix.

Per-section checks live in ``__post_init__``; checks that span sections or need the world
size live in :func:`validate`, which every rank runs before any process group is created.
"""

from moe_dist.config.errors import ConfigError
from moe_dist.config.loading import (CONFIG_DIR, DEFAULT_CONFIG, config_from_dict, from_dict, load_config,
                                     parse_override)
from moe_dist.config.model import MHMoEConfig, ModelConfig, PEERConfig, StratifiedConfig, SwitchHeadConfig
from moe_dist.config.moe import AdaptiveConfig, CapacityConfig, MoEConfig, RouterConfig
from moe_dist.config.root import Config
from moe_dist.config.run import (CheckpointConfig, DataConfig, LogConfig, ParallelConfig, TrainConfig,
                                ZeroConfig)
from moe_dist.config.validation import grad_accum_steps, resolve_dp, validate

__all__ = [
    "CONFIG_DIR", "DEFAULT_CONFIG", "AdaptiveConfig", "CapacityConfig", "CheckpointConfig", "Config",
    "ConfigError", "DataConfig", "LogConfig", "MHMoEConfig", "MoEConfig", "ModelConfig", "PEERConfig",
    "ParallelConfig", "RouterConfig", "StratifiedConfig", "SwitchHeadConfig", "TrainConfig", "ZeroConfig",
    "config_from_dict", "from_dict", "grad_accum_steps", "load_config", "parse_override", "resolve_dp",
    "validate",
]

"""Typed training configuration: frozen dataclass sections, YAML files, dotted `key=value` overrides.

A config is `TrainConfig` with one section per pipeline stage (`sections.py`: the fields, their
ranges and the checks across them). `load_config(files, overrides)` (`loading.py`) merges YAML
files in order (a file's `include: [other.yaml, ...]`, relative to it, first), then
`section.key=value` overrides, and validates: an unknown key, a value of the wrong type or out of
its range or an impossible combination raises `ConfigError` naming the key.
"""

from ktae_jax.config.loading import INCLUDE_KEY, load_config, parse_override
from ktae_jax.config.sections import (
    RANGES,
    SECTIONS,
    AlgoSection,
    ConfigError,
    DataSection,
    KTAESection,
    LoraSection,
    ModelSection,
    OptimSection,
    RewardSection,
    RolloutSection,
    RunSection,
    TrainConfig,
    in_range,
)

__all__ = [
    "INCLUDE_KEY", "RANGES", "SECTIONS", "AlgoSection", "ConfigError", "DataSection", "KTAESection", "LoraSection",
    "ModelSection", "OptimSection", "RewardSection", "RolloutSection", "RunSection", "TrainConfig",
    "in_range", "load_config", "parse_override",
]

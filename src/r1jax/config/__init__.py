"""Frozen dataclass configs, the single source of truth: YAML files and `section.field=value` overrides only
replace fields (load.py); model.py holds the network's sections, run.py the rest. This face hands names on."""

from r1jax.config.errors import ConfigError
from r1jax.config.load import apply_overrides, load, parse_override, to_dict, weighted_names
from r1jax.config.model import FP8Config, ModelConfig
from r1jax.config.run import (CheckpointConfig, DataConfig, DataSource, GRPOConfig, MeshConfig, OptimConfig,
                              PipelineConfig, RunConfig, SamplerConfig, TrainConfig)

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "DataSource", "FP8Config", "GRPOConfig", "MeshConfig",
           "ModelConfig", "OptimConfig", "PipelineConfig", "RunConfig", "SamplerConfig", "TrainConfig",
           "apply_overrides", "load", "parse_override", "to_dict", "weighted_names"]

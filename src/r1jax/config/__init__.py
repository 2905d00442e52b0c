"""Frozen dataclass configs, the single source of truth: YAML files and `section.field=value` overrides only
replace fields (load.py). model.py holds the architecture, compute.py how a run computes it, run.py the rest
and RunConfig. This face only hands names on."""

from r1jax.config.compute import ComputeConfig, FP8Config
from r1jax.config.errors import ConfigError
from r1jax.config.load import (MOVED, apply_overrides, load, load_dict, migrate, parse_override, read_yaml,
                               to_dict, weighted_names)
from r1jax.config.model import ModelConfig
from r1jax.config.run import (CheckpointConfig, DataConfig, DataSource, GRPOConfig, MeshConfig, OptimConfig,
                              PipelineConfig, RunConfig, SamplerConfig, TrainConfig)

__all__ = ["MOVED", "CheckpointConfig", "ComputeConfig", "ConfigError", "DataConfig", "DataSource", "FP8Config",
           "GRPOConfig", "MeshConfig", "ModelConfig", "OptimConfig", "PipelineConfig", "RunConfig", "SamplerConfig",
           "TrainConfig", "apply_overrides", "load", "load_dict", "migrate", "parse_override", "read_yaml", "to_dict",
           "weighted_names"]

"""Typed configuration: ``load(recipe, overrides)`` returns a validated, read-only RootConfig.
Importing it costs no torch (launchers and submit hosts read recipes with it)."""
from anchorformer.config.load import (
    check_world_size, describe, field_help, from_dict, load, to_dict, to_yaml,
)
from anchorformer.config.schema import (
    AugmentConfig, CheckpointConfig, ConfigError, DataConfig, DeepSpeedConfig, DetectionConfig, EmaConfig,
    LoggingConfig, LossConfig, MixupSection, ModelConfig, OptimConfig, RootConfig, ScheduleConfig,
    SegmentationConfig, SlurmConfig, TrainConfig,
)

__all__ = [
    "load", "from_dict", "to_dict", "to_yaml", "check_world_size", "describe", "field_help",
    "ConfigError", "RootConfig", "ModelConfig", "DataConfig", "AugmentConfig", "MixupSection",
    "OptimConfig", "ScheduleConfig", "LossConfig", "TrainConfig", "EmaConfig", "DeepSpeedConfig",
    "CheckpointConfig", "LoggingConfig", "SlurmConfig", "DetectionConfig", "SegmentationConfig",
]

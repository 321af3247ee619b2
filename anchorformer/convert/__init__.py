"""Checkpoint conversion: DeepSpeed runs / state dicts / safetensors -> classification models and
detection/segmentation backbones (safetensors with provenance), with a parity check."""
from anchorformer.convert.export import (
    Exported, build_source_model, config_path, create_model_from_export, export_backbone, export_classification,
    read_metadata,
)
from anchorformer.convert.parity import backbone_parity, classification_parity, fixed_input
from anchorformer.convert.source import SourceCheckpoint, find_tag_dir, load_source

__all__ = [
    "SourceCheckpoint", "load_source", "find_tag_dir", "Exported", "build_source_model", "export_classification",
    "export_backbone", "read_metadata", "create_model_from_export", "config_path", "classification_parity",
    "backbone_parity", "fixed_input",
]

"""Checkpoint conversion: DeepSpeed runs / state dicts / safetensors -> classification models (a
safetensors file, or a folder in timm's own layout with the recipe's preprocessing and class names)
and detection/segmentation backbones, each parity-checked before it is moved into place; ONNX and
torch.export graphs; and any of them loaded back for inference."""
from anchorformer.convert.export import (
    Exported, Verify, build_source_model, config_path, create_model_from_export, export_backbone,
    export_classification, read_metadata,
)
from anchorformer.convert.graph_export import FORMATS, GraphExport, export_graph
from anchorformer.convert.inference import InferenceModel, add_model_arguments, load_for_inference
from anchorformer.convert.parity import backbone_parity, classification_parity, fixed_input
from anchorformer.convert.source import SourceCheckpoint, find_tag_dir, load_source
from anchorformer.convert.timm_folder import export_timm_folder, is_timm_folder, load_timm_folder

__all__ = [
    "SourceCheckpoint", "load_source", "find_tag_dir", "Exported", "Verify", "build_source_model",
    "export_classification", "export_backbone", "export_timm_folder", "load_timm_folder", "is_timm_folder",
    "read_metadata", "create_model_from_export", "config_path", "classification_parity", "backbone_parity",
    "fixed_input", "FORMATS", "GraphExport", "export_graph", "InferenceModel", "load_for_inference",
    "add_model_arguments",
]

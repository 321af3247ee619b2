"""AnchorFormer training framework. ``import anchorformer`` registers the models with timm."""
from . import models  # noqa: F401  (registers anchorformer_* with timm)

__version__ = "0.1.0"

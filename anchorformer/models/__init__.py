"""AnchorFormer models; importing this package registers them with timm."""
from .anchor_attention import AnchorAttention
from .anchorformer import (AnchorBlock, AnchorFormer, AnchorFormerDistilled, checkpoint_filter_fn, default_weights_file,
                           weights_dir)
from .errors import ModelArgumentError

__all__ = ["AnchorAttention", "AnchorBlock", "AnchorFormer", "AnchorFormerDistilled",
           "checkpoint_filter_fn", "default_weights_file", "weights_dir", "ModelArgumentError"]

"""Data: shards written by ``tools/make_shards.py``, streamed to every rank with webdataset, with
timm transforms, Mixup/CutMix, exact mid-epoch resume, and the embedded digits dataset; the COCO and
ADE20K readers and their streams. Every stream counts skips by the same ``SKIP_REASONS``."""
from anchorformer.data.dense import MapTrainStream, eval_loader
from anchorformer.data.embedded import EmbeddedDataset, prepare_embedded_dataset
from anchorformer.data.shards import TrainStream, ValStream, build_train_stream, build_val_stream
from anchorformer.data.stages import SKIP_REASONS

__all__ = ["EmbeddedDataset", "prepare_embedded_dataset", "TrainStream", "ValStream", "build_train_stream",
           "build_val_stream", "MapTrainStream", "eval_loader", "SKIP_REASONS"]

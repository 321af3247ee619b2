"""What a training run's recorded recipe says about using its model: the configuration itself (the
trainer stores it in every checkpoint) and the class names, read from the index written beside the
run's shards (or the embedded digits' index)."""
from __future__ import annotations

import logging
from typing import Optional

from anchorformer import config
from anchorformer.config import RootConfig
from anchorformer.convert.source import SourceCheckpoint
from anchorformer.data import prepare_embedded_dataset
from anchorformer.data.index import find_index, read_index

__all__ = ["recipe_of", "recipe_label_names"]

logger = logging.getLogger(__name__)


def recipe_of(source: SourceCheckpoint) -> Optional[RootConfig]:
    """The validated configuration recorded with ``source``; None when it records none.

    Raises:
        ValueError: when the recorded configuration no longer validates (e.g. a renamed key).
    """
    if not source.recipe:
        return None
    try:
        return config.from_dict(source.recipe)
    except config.ConfigError as err:
        raise ValueError(f"the configuration recorded in {source.source} does not load ({err}); convert it "
                         "with --model and --model-args instead") from err


def recipe_label_names(recipe: RootConfig) -> Optional[list[str]]:
    """The class names by label of a run's data: the embedded digits (``"0"`` .. ``"9"``), or the
    ``classes`` of the shards' index JSON (``data.val_index`` / ``data.train_index``, else the
    ``{name}-index.json`` beside the shards). None when no index can be found."""
    data = recipe.data
    if data.source == "embedded":
        return read_index(prepare_embedded_dataset(data.cache_dir, image_size=data.image_size).val_index).classes
    for shards, index in ((data.val_shards, data.val_index), (data.train_shards, data.train_index)):
        found = find_index(shards, index) if shards else None
        if found is not None and found.is_file():
            return read_index(found).classes
    logger.warning("no shard index beside %s: the export carries no class names", data.val_shards)
    return None

"""What the dense tasks (detection, segmentation) share on the task side: their config section. The
encoder's ``timm.create_model`` arguments are ``ModelConfig.timm_kwargs(classifier=False)``; the
networks (backbone, feature pyramid, weight loading, heads) are model code: ``anchorformer.models``;
whole weights for inference under ZeRO-3 come from ``anchorformer.dist.zero``.
"""
from __future__ import annotations

from typing import Any

__all__ = ["task_options"]


def task_options(cfg: Any, task: str) -> Any:
    """The config section named after a dense task (``cfg.detection``, ``cfg.segmentation``).

    Raises:
        ValueError: when this installation's config schema has no such section.
    """
    section = getattr(cfg, task, None)
    if section is None:
        raise ValueError(f"task={task} needs the '{task}:' config section (dataset paths, sizes), which this "
                         f"installation's config schema lacks; see docs/downstream.md")
    return section

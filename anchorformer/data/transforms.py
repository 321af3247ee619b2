"""Image transforms, built with timm from the config's own sections: the training transform
(random resized crop, flip, color jitter, RandAugment or DeiT-III three-augment, random erasing) and
the evaluation transform (resize + center crop) from ``data.augment`` at ``data.image_size``, and
Mixup/CutMix with label smoothing from ``data.mixup``. Every augmentation rule lives in
``config.schema``; the builders take validated sections and check nothing of their own."""
from typing import Any, Callable, Mapping

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AugmentOp

from anchorformer.config import AugmentConfig, MixupSection

__all__ = ["build_train_transform", "build_eval_transform", "eval_pretrained_cfg", "eval_preprocessing",
           "build_mixup"]


def _posterize(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """Posterize that keeps 0 bits as a black image, as Pillow < 12 did (Pillow 12+ rejects 0,
    which timm's RandAugment asks for at magnitude 10)."""
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _augment_ops(transform: object) -> list[AugmentOp]:
    """The timm AugmentOps inside a transform (RandAugment/AugMix ``ops``, AutoAugment ``policy``)."""
    found = []
    children = list(getattr(transform, "transforms", [])) + list(getattr(transform, "ops", []))
    for sub_policy in getattr(transform, "policy", []):
        children += list(sub_policy)
    for child in children:
        found += [child] if isinstance(child, AugmentOp) else _augment_ops(child)
    return found


def build_train_transform(augment: AugmentConfig, image_size: int) -> Callable:
    """The timm training transform: PIL image -> normalized float tensor (3, size, size).

    Args:
        augment: the augmentation options (``data.augment``).
        image_size: side of the square crop fed to the model, pixels (``data.image_size``).

    Returns:
        A picklable callable.
    """
    transform = create_transform(
        image_size, is_training=True, scale=augment.scale, ratio=augment.ratio, hflip=augment.hflip,
        color_jitter=augment.color_jitter, auto_augment="3a" if augment.three_augment else augment.auto_augment,
        interpolation=augment.interpolation, re_prob=augment.re_prob, re_mode=augment.re_mode,
        re_count=augment.re_count, mean=augment.mean, std=augment.std)
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


def _eval_interpolation(augment: AugmentConfig) -> str:
    """The evaluation resize's interpolation: the training one, bicubic for a random one."""
    return "bicubic" if augment.interpolation == "random" else augment.interpolation


def build_eval_transform(augment: AugmentConfig, image_size: int) -> Callable:
    """The timm evaluation transform: resize to ``image_size / augment.crop_pct``, center crop
    ``image_size``, normalize.

    Args:
        augment: the crop fraction, interpolation and normalisation (``data.augment``).
        image_size: side of the square center crop, pixels (``data.image_size``).

    Returns:
        A picklable callable: PIL image -> float tensor (3, size, size).
    """
    return create_transform(image_size, is_training=False, crop_pct=augment.crop_pct,
                            interpolation=_eval_interpolation(augment), mean=augment.mean, std=augment.std)


def eval_pretrained_cfg(augment: AugmentConfig, image_size: int) -> dict[str, Any]:
    """The evaluation preprocessing as timm pretrained-cfg fields: ``timm.data.resolve_data_config``
    reads them back, and ``create_transform(**that)`` builds the same transform as
    :func:`build_eval_transform`."""
    return {"input_size": (3, image_size, image_size), "interpolation": _eval_interpolation(augment),
            "mean": augment.mean, "std": augment.std, "crop_pct": augment.crop_pct, "crop_mode": "center"}


def eval_preprocessing(data_config: Mapping[str, Any]) -> tuple[AugmentConfig, int]:
    """The evaluation preprocessing of a timm data config (``resolve_data_config``'s result or a
    pretrained cfg) as ``(augment, image_size)``: its crop fraction, interpolation and normalisation
    (the training options keep their defaults) and its input side.

    Raises:
        ValueError: for a non-square input size, a crop mode other than ``center``, or values the
            ``data.augment`` section does not accept.
    """
    height, width = data_config["input_size"][-2:]
    if height != width or data_config.get("crop_mode", "center") != "center":
        raise ValueError(f"only square center-crop preprocessing is supported, got input_size "
                         f"{tuple(data_config['input_size'])} and crop_mode {data_config.get('crop_mode')!r}")
    augment = AugmentConfig(crop_pct=float(data_config.get("crop_pct", 0.875)),
                            interpolation=data_config.get("interpolation", "bicubic"),
                            mean=tuple(data_config.get("mean", IMAGENET_DEFAULT_MEAN)),
                            std=tuple(data_config.get("std", IMAGENET_DEFAULT_STD)))
    return augment, int(height)


def build_mixup(mixup: MixupSection, num_classes: int,
                label_smoothing: float) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """timm's Mixup/CutMix for ``num_classes``: ``(images, int targets) -> (images, soft targets)``.

    Args:
        mixup: mixing options (``data.mixup``).
        num_classes: classes of the soft targets.
        label_smoothing: smoothing of the soft targets (``loss.label_smoothing``).

    Returns:
        The timm ``Mixup`` callable (needs an even batch size).
    """
    return Mixup(mixup_alpha=mixup.mixup_alpha, cutmix_alpha=mixup.cutmix_alpha, prob=mixup.prob,
                 switch_prob=mixup.switch_prob, mode=mixup.mode, label_smoothing=label_smoothing,
                 num_classes=num_classes)

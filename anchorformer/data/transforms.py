"""Image transforms, built with timm: the training transform (random resized crop, flip, color
jitter, RandAugment or DeiT-III three-augment, random erasing), the evaluation transform (resize +
center crop), and Mixup/CutMix with label smoothing. The option dataclasses hold what the builders
take, with the DeiT recipe's defaults; they do not check their values: every augmentation rule lives
in ``config.schema`` (``data.augment``, ``data.mixup``), and ``train_transform_config`` /
``eval_transform_config`` / ``mixup_config`` turn a validated ``data`` section into them."""
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from PIL import Image, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.auto_augment import AugmentOp

from anchorformer.config import DataConfig

__all__ = ["TrainTransformConfig", "EvalTransformConfig", "MixupConfig", "build_train_transform",
           "build_eval_transform", "train_transform_config", "eval_transform_config", "mixup_config",
           "build_mixup"]


@dataclass
class TrainTransformConfig:
    """Training augmentation (timm ``create_transform(is_training=True)``)."""
    image_size: int = 224
    """side of the square crop fed to the model, pixels"""
    scale: tuple[float, float] = (0.08, 1.0)
    """random-resized-crop area range, fraction of the image"""
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    """random-resized-crop aspect-ratio range"""
    hflip: float = 0.5
    """horizontal flip probability"""
    color_jitter: float = 0.3
    """color jitter strength (brightness/contrast/saturation); timm ignores it under RandAugment"""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm auto-augment policy string (e.g. ``rand-m9-mstd0.5-inc1``); None disables"""
    interpolation: str = "bicubic"
    """resize interpolation: bilinear, bicubic, nearest or random"""
    re_prob: float = 0.25
    """random erasing probability; 0 disables"""
    re_mode: str = "pixel"
    """random erasing fill: const, rand or pixel"""
    re_count: int = 1
    """random erasing: most regions erased per image"""
    three_augment: bool = False
    """DeiT-III three-augment (one of grayscale/solarize/blur + color jitter) instead of auto_augment"""
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    """normalization mean (RGB, 0..1 scale)"""
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    """normalization std (RGB, 0..1 scale)"""


@dataclass
class EvalTransformConfig:
    """Evaluation preprocessing: resize to ``image_size / crop_pct``, center crop ``image_size``."""
    image_size: int = 224
    """side of the square center crop, pixels"""
    crop_pct: float = 0.875
    """fraction of the resized image kept by the center crop"""
    interpolation: str = "bicubic"
    """resize interpolation: bilinear, bicubic or nearest"""
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    """normalization mean (RGB, 0..1 scale)"""
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    """normalization std (RGB, 0..1 scale)"""

    def as_pretrained_cfg(self) -> dict[str, Any]:
        """These options as timm pretrained-cfg fields: ``timm.data.resolve_data_config`` reads them
        back, and ``create_transform(**that)`` builds the same transform as :func:`build_eval_transform`."""
        return {"input_size": (3, self.image_size, self.image_size), "interpolation": self.interpolation,
                "mean": self.mean, "std": self.std, "crop_pct": self.crop_pct, "crop_mode": "center"}

    @classmethod
    def from_data_config(cls, data_config: Mapping[str, Any]) -> "EvalTransformConfig":
        """The options of a timm data config (``resolve_data_config``'s result or a pretrained cfg).

        Raises:
            ValueError: for a non-square input size or a crop mode other than ``center``.
        """
        height, width = data_config["input_size"][-2:]
        if height != width or data_config.get("crop_mode", "center") != "center":
            raise ValueError(f"only square center-crop preprocessing is supported, got input_size "
                             f"{tuple(data_config['input_size'])} and crop_mode {data_config.get('crop_mode')!r}")
        return cls(image_size=int(height), crop_pct=float(data_config.get("crop_pct", 0.875)),
                   interpolation=data_config.get("interpolation", "bicubic"),
                   mean=tuple(data_config.get("mean", IMAGENET_DEFAULT_MEAN)),
                   std=tuple(data_config.get("std", IMAGENET_DEFAULT_STD)))


def train_transform_config(data: DataConfig) -> TrainTransformConfig:
    """A recipe's training augmentation: ``data.image_size`` and the ``data.augment`` options."""
    a = data.augment
    return TrainTransformConfig(image_size=data.image_size, scale=a.scale, ratio=a.ratio, hflip=a.hflip,
                                color_jitter=a.color_jitter, auto_augment=a.auto_augment,
                                interpolation=a.interpolation, re_prob=a.re_prob, re_mode=a.re_mode,
                                re_count=a.re_count, three_augment=a.three_augment, mean=a.mean, std=a.std)


def eval_transform_config(data: DataConfig) -> EvalTransformConfig:
    """A recipe's evaluation preprocessing: ``data.image_size`` and the ``data.augment`` crop and
    normalisation (a random training interpolation evaluates with bicubic)."""
    augment = data.augment
    return EvalTransformConfig(image_size=data.image_size, crop_pct=augment.crop_pct,
                               interpolation="bicubic" if augment.interpolation == "random" else augment.interpolation,
                               mean=augment.mean, std=augment.std)


@dataclass
class MixupConfig:
    """Mixup/CutMix on each training batch (timm ``Mixup``); targets become soft (B, num_classes)."""
    mixup_alpha: float = 0.8
    """mixup Beta(alpha, alpha); 0 disables mixup"""
    cutmix_alpha: float = 1.0
    """cutmix Beta(alpha, alpha); 0 disables cutmix"""
    prob: float = 1.0
    """probability of mixing a batch (or pair/element)"""
    switch_prob: float = 0.5
    """probability of cutmix instead of mixup when both are enabled"""
    mode: str = "batch"
    """one mixing per batch, per pair or per element"""
    label_smoothing: float = 0.1
    """label smoothing of the soft targets"""


def mixup_config(data: DataConfig, label_smoothing: float) -> MixupConfig | None:
    """A recipe's Mixup/CutMix (``data.mixup``, smoothing the soft targets by ``label_smoothing``,
    i.e. ``loss.label_smoothing``); None when ``data.mixup`` mixes nothing."""
    m = data.mixup
    if not m.enabled:
        return None
    return MixupConfig(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                       switch_prob=m.switch_prob, mode=m.mode, label_smoothing=label_smoothing)


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


def build_train_transform(config: TrainTransformConfig) -> Callable:
    """The timm training transform: PIL image -> normalized float tensor (3, size, size).

    Args:
        config: the augmentation options.

    Returns:
        A picklable callable.
    """
    transform = create_transform(
        config.image_size, is_training=True, scale=config.scale, ratio=config.ratio, hflip=config.hflip,
        color_jitter=config.color_jitter, auto_augment="3a" if config.three_augment else config.auto_augment,
        interpolation=config.interpolation, re_prob=config.re_prob, re_mode=config.re_mode,
        re_count=config.re_count, mean=config.mean, std=config.std)
    for op in _augment_ops(transform):
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return transform


def build_eval_transform(config: EvalTransformConfig) -> Callable:
    """The timm evaluation transform: resize, center crop, normalize.

    Args:
        config: the preprocessing options.

    Returns:
        A picklable callable: PIL image -> float tensor (3, size, size).
    """
    return create_transform(config.image_size, is_training=False, crop_pct=config.crop_pct,
                            interpolation=config.interpolation, mean=config.mean, std=config.std)


def build_mixup(config: MixupConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """timm's Mixup/CutMix for ``num_classes``: ``(images, int targets) -> (images, soft targets)``.

    Args:
        config: mixing options.
        num_classes: classes of the soft targets.

    Returns:
        The timm ``Mixup`` callable (needs an even batch size).
    """
    return Mixup(mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha, prob=config.prob,
                 switch_prob=config.switch_prob, mode=config.mode, label_smoothing=config.label_smoothing,
                 num_classes=num_classes)

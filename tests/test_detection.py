"""Detection stage on a tiny synthetic COCO set written in the test: real JPEGs + instances JSON
with rectangles (category 1) and ellipses (category 2) whose boxes and masks are known exactly."""
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from dense_fixtures import train_recipe, train_steps

from anchorformer.convert import export_backbone, load_source
from anchorformer.data.coco import CocoInstances, collate_detection
from anchorformer.data.dense import MapTrainStream, eval_loader
from anchorformer.data.stages import SKIP_REASONS
from anchorformer.models.backbone import AnchorFormerBackbone
from anchorformer.models.mask_rcnn import build_detector
from anchorformer.tasks.detection import coco_metrics, detection_loss, evaluate_detection

TINY = dict(embed_dim=64, depth=2, num_heads=2, num_anchors=8)
IMAGE = 96
COLOURS = {1: (220, 40, 40), 2: (40, 60, 220)}


def _ellipse_polygon(x0: float, y0: float, x1: float, y1: float, points: int = 32) -> list:
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    return [v for k in range(points)
            for v in (cx + rx * math.cos(2 * math.pi * k / points), cy + ry * math.sin(2 * math.pi * k / points))]


def write_coco(root: Path, num_images: int, seed: int, name: str = "train") -> tuple:
    """``num_images`` JPEGs with 1-2 non-overlapping shapes each; returns (json path, image dir)."""
    rng = random.Random(seed)
    image_dir = root / name
    image_dir.mkdir(parents=True)
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        canvas = Image.new("RGB", (IMAGE, IMAGE), tuple(rng.randint(110, 150) for _ in range(3)))
        draw = ImageDraw.Draw(canvas)
        slots = rng.sample([(0, 0), (48, 0), (0, 48), (48, 48)], rng.randint(1, 2))
        for sx, sy in slots:
            category = rng.choice((1, 2))
            w, h = rng.randint(24, 44), rng.randint(24, 44)
            x0, y0 = sx + rng.randint(0, 48 - w), sy + rng.randint(0, 48 - h)
            x1, y1 = x0 + w, y0 + h
            polygon = [x0, y0, x1, y0, x1, y1, x0, y1] if category == 1 else _ellipse_polygon(x0, y0, x1, y1)
            draw.polygon(polygon, fill=COLOURS[category])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x0, y0, w, h], "area": float(w * h), "iscrowd": 0,
                                "segmentation": [polygon]})
        file_name = f"{image_id:05d}.jpg"
        canvas.save(image_dir / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": IMAGE, "height": IMAGE})
    annotation_file = root / f"instances_{name}.json"
    annotation_file.write_text(json.dumps({
        "images": images, "annotations": annotations,
        "categories": [{"id": 1, "name": "rectangle"}, {"id": 2, "name": "ellipse"}]}))
    return annotation_file, image_dir


def _detector(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return build_detector("anchorformer_tiny_patch16_224", num_classes=2, image_size=IMAGE, train_scales=(IMAGE,),
                          model_kwargs=TINY, out_channels=32, mask_head_channels=32, rois_per_image=64, **kwargs)


def _train(model, dataset, steps: int, lr: float, batch_size: int = 4) -> list:
    return train_steps(model, dataset, collate_detection, detection_loss, steps, lr, batch_size)


def test_reader_targets_match_the_drawn_shapes(tmp_path):
    annotation_file, image_dir = write_coco(tmp_path, 4, seed=1)
    dataset = CocoInstances(annotation_file, image_dir, train=False)
    data = json.loads(annotation_file.read_text())
    image, target = dataset[0]
    assert image.shape == (3, IMAGE, IMAGE) and 0.0 <= image.min() and image.max() <= 1.0
    first = [a for a in data["annotations"] if a["image_id"] == dataset.images[0]["id"]]
    x, y, w, h = first[0]["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert [dataset.category_id(int(label)) for label in target["labels"]] == [a["category_id"] for a in first]
    # the mask covers its box (up to polygon rasterisation) and the drawn colour sits under it
    mask = target["masks"][0].bool()
    assert abs(int(mask.sum()) - first[0]["area"] * (1.0 if first[0]["category_id"] == 1 else math.pi / 4)) \
        < 0.15 * first[0]["area"]
    colour = torch.tensor(COLOURS[first[0]["category_id"]]) / 255.0
    assert (image[:, mask].mean(dim=1) - colour).abs().max() < 0.1


def test_training_flip_moves_boxes_and_masks_together(tmp_path):
    annotation_file, image_dir = write_coco(tmp_path, 2, seed=2)
    plain = CocoInstances(annotation_file, image_dir, train=False)[0][1]
    flipped = CocoInstances(annotation_file, image_dir, train=True, hflip=1.0)[0][1]
    assert torch.equal(flipped["masks"], plain["masks"].flip(-1))
    assert torch.equal(flipped["boxes"][:, 0], IMAGE - plain["boxes"][:, 2])


def test_corrupt_and_missing_images_are_skipped_and_counted_in_the_shard_vocabulary(tmp_path):
    annotation_file, image_dir = write_coco(tmp_path, 4, seed=3)
    (image_dir / "00002.jpg").write_bytes(b"not a jpeg")
    (image_dir / "00003.jpg").unlink()
    dataset = CocoInstances(annotation_file, image_dir, train=False)
    batch = collate_detection([dataset[i] for i in range(4)])
    assert batch.skips["decode_error"] == 1 and batch.skips["missing_image"] == 1 and len(batch.images) == 2
    stream = MapTrainStream(dataset, collate_detection, rank=0, world_size=1, micro_batch_size=4, num_workers=0,
                            seed=0)
    list(stream)
    assert stream.skip_counts() == {**dict.fromkeys(SKIP_REASONS, 0), "decode_error": 1, "missing_image": 1}


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), ("{not json", "not valid JSON"), ('{"images": []}', "lacks the list"),
])
def test_bad_annotation_file_names_the_problem(tmp_path, content, message):
    path = tmp_path / "instances.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        CocoInstances(path, tmp_path, train=True)


def test_bad_scales_are_rejected():
    with pytest.raises(ValueError, match="train_scales"):
        build_detector("anchorformer_tiny_patch16_224", 2, image_size=64, train_scales=(128,), model_kwargs=TINY)


def test_coco_metrics_of_the_ground_truth_itself_are_perfect(tmp_path):
    annotation_file, _ = write_coco(tmp_path, 5, seed=4)
    data = json.loads(annotation_file.read_text())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0,
                "segmentation": a["segmentation"]} for a in data["annotations"]]
    metrics = coco_metrics(annotation_file, results, [image["id"] for image in data["images"]])
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    assert coco_metrics(annotation_file, [], [1])["bbox_AP"] == 0.0


def test_a_few_steps_lower_the_loss_and_evaluation_returns_valid_ap(tmp_path):
    annotation_file, image_dir = write_coco(tmp_path, 4, seed=5)
    model = _detector()
    losses = _train(model, CocoInstances(annotation_file, image_dir, train=True), steps=6, lr=1e-3, batch_size=2)
    assert np.mean(losses[-2:]) < losses[0], losses
    val = CocoInstances(annotation_file, image_dir, train=False)
    batches = DataLoader(val, batch_size=2, collate_fn=collate_detection)
    metrics = evaluate_detection(model, batches, val, torch.device("cpu"))
    assert set(metrics) >= {"bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"}
    assert all(0.0 <= value <= 100.0 for value in metrics.values())


@pytest.mark.slow
def test_training_on_separable_shapes_reaches_the_ap_bar(tmp_path):
    # measured: bbox AP50 88, segm AP50 88 (AP 33 / 46) after these 40 steps
    train_file, train_dir = write_coco(tmp_path, 32, seed=6, name="train")
    val_file, val_dir = write_coco(tmp_path, 16, seed=7, name="val")
    model = _detector()
    _train(model, CocoInstances(train_file, train_dir, train=True), steps=40, lr=1e-3, batch_size=2)
    val = CocoInstances(val_file, val_dir, train=False)
    metrics = evaluate_detection(model, DataLoader(val, batch_size=4, collate_fn=collate_detection), val,
                                 torch.device("cpu"))
    assert metrics["bbox_AP50"] >= 50.0, metrics
    assert metrics["segm_AP50"] >= 50.0, metrics


@pytest.mark.slow
def test_the_trainer_fine_tunes_the_recipe_from_a_backbone_export(tmp_path):
    """launch/train.py with configs/coco_maskrcnn_tiny.yaml (shrunk by overrides) on the synthetic
    set, starting from a backbone export: training steps, COCO evaluation, checkpoint, summary."""
    train_file, train_dir = write_coco(tmp_path, 4, seed=8, name="train")
    val_file, val_dir = write_coco(tmp_path, 2, seed=9, name="val")
    torch.manual_seed(0)
    pretrained = timm.create_model("anchorformer_tiny_patch16_224", num_classes=5, img_size=64, **TINY)
    torch.save(pretrained.state_dict(), tmp_path / "pretrained.pth")
    export = export_backbone(load_source(tmp_path / "pretrained.pth"), tmp_path / "backbone.safetensors", IMAGE,
                             model_name="anchorformer_tiny_patch16_224", model_args=dict(TINY, img_size=64))
    overrides = [
        "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.num_anchors=8", "model.num_classes=2",
        f"model.pretrained_checkpoint={export.path}",
        f"detection.train_annotations={train_file}", f"detection.train_images={train_dir}",
        f"detection.val_annotations={val_file}", f"detection.val_images={val_dir}",
        f"detection.image_size={IMAGE}", f"detection.train_scales=[{IMAGE}]", "detection.pyramid_channels=32",
        "detection.mask_head_channels=32", "detection.rois_per_image=64", "data.num_workers=0",
        "train.global_batch_size=2", "train.micro_batch_size=2", "train.max_steps=2", "train.device=cpu",
        "schedule.epochs=1", "schedule.warmup_epochs=0", "checkpoint.every_steps=0",
    ]
    summary = train_recipe("coco_maskrcnn_tiny.yaml", overrides, tmp_path / "runs", "det")
    assert summary["step"] == 2 and summary["status"] == "completed"
    assert 0.0 <= summary["metrics"]["eval/bbox_AP"] <= 100.0
    assert 0.0 <= summary["metrics"]["eval/segm_AP50"] <= 100.0
    assert (tmp_path / "runs" / "det" / "checkpoints" / "latest").read_text().strip() == "step_2"


def test_training_stream_splits_ranks_and_resumes_at_the_same_sample(tmp_path):
    annotation_file, image_dir = write_coco(tmp_path, 9, seed=10)
    dataset = CocoInstances(annotation_file, image_dir, train=False)

    def stream(rank: int) -> MapTrainStream:
        return MapTrainStream(dataset, collate_detection, rank=rank, world_size=2, micro_batch_size=2,
                              num_workers=0, seed=3)

    def ids(batches) -> list:
        return [int(t["image_id"]) for batch in batches for t in batch.targets]

    assert stream(0).steps_per_epoch == 2  # 9 images // (2 x 2): the remainder is dropped
    epoch0 = [ids(stream(rank)) for rank in (0, 1)]
    assert len(set(epoch0[0] + epoch0[1])) == 8 and not set(epoch0[0]) & set(epoch0[1])
    first = stream(0)
    first.set_epoch(1)
    uninterrupted = ids(first)
    assert uninterrupted != epoch0[0], "each epoch has its own order"
    partial = stream(0)
    partial.set_epoch(1)
    head = ids([next(iter(partial))])
    resumed = stream(0)
    resumed.load_state_dict(json.loads(json.dumps(partial.state_dict())))
    resumed.set_epoch(1)
    assert head + ids(resumed) == uninterrupted
    with pytest.raises(ValueError, match="train.seed"):
        MapTrainStream(dataset, collate_detection, rank=0, world_size=2, micro_batch_size=2, num_workers=0,
                       seed=4).load_state_dict(partial.state_dict())
    with pytest.raises(ValueError, match="fewer than one global batch"):
        MapTrainStream(dataset, collate_detection, rank=0, world_size=4, micro_batch_size=4, num_workers=0, seed=0)
    shares = [ids(eval_loader(dataset, collate_detection, rank=r, world_size=2, batch_size=4, num_workers=0))
              for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(1, 10))


def test_backbone_pyramid_has_strides_4_to_64_for_any_multiple_of_32():
    backbone = AnchorFormerBackbone("anchorformer_tiny_patch16_224", 64, out_channels=16, extra_pool_level=True,
                                    model_kwargs=TINY)
    features = backbone(torch.randn(1, 3, 128, 96))  # not the pos_embed size: resampled on the fly
    assert {name: tuple(f.shape[-2:]) for name, f in features.items()} == {
        "0": (32, 24), "1": (16, 12), "2": (8, 6), "3": (4, 3), "pool": (2, 2)}
    assert all(f.shape[1] == 16 for f in features.values())
    with pytest.raises(ValueError, match="patch size 16"):
        AnchorFormerBackbone("anchorformer_tiny_patch16_224", 64, model_kwargs=dict(TINY, patch_size=8))

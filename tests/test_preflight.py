"""Bad input refused at the door: launch/train.py (and launch/submit.py) run the pre-flight right
after loading the config, so every input that would fail later (a model the constructor refuses,
missing data, too few shards for the readers, an unusable checkpoint or output folder) exits 2 with
one line naming the key, before any process group, run folder or model exists."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from data_fixtures import write_jpeg_shards
from helpers import REPO, cpu_env

from anchorformer import config
from anchorformer.config import ConfigError
from anchorformer.engine.checkpoint import model_signature
from anchorformer.engine.preflight import check_run
from anchorformer.models import AnchorFormer
from anchorformer.tasks.classification import create_classifier

TRAIN = str(REPO / "launch" / "train.py")
DEMO = str(REPO / "configs" / "demo.yaml")
SHARDS = ["data.source=shards", "data.train_shards={train}", "data.val_shards={val}", "data.num_workers=1"]
"""The demo recipe on the fixture's shards: 4 training shards of 8 digits, 1 validation shard."""

# (id, overrides, launcher environment, key named, fragment of the message)
BAD_INPUTS = [
    ("kwargs-typo", ["model.kwargs.num_anchor=16"], {}, "model.kwargs.num_anchor",
     "did you mean 'model.num_anchors'?"),
    ("no-anchors", ["model.num_anchors=0"], {}, "model.num_anchors", "must be an integer >= 1"),
    ("width-vs-heads", ["model.embed_dim=100"], {}, "model.embed_dim", "divisible by num_heads=3"),
    ("no-blocks", ["model.depth=0"], {}, "model.depth", "got depth=0"),
    ("patch-vs-image", ["model.img_size=15", "data.image_size=15"], {}, "model.img_size",
     "not divisible by patch_size=(4, 4)"),
    ("img-vs-image-size", ["data.image_size=15"], {}, "model.img_size", "differs from data.image_size=15"),
    ("unregistered-model", ["model.name=anchorformer_tiny_patch16_22"], {}, "model.name",
     "did you mean 'anchorformer_tiny_patch16_224'"),
    ("missing-shards", ["data.source=shards", "data.train_shards={root}/nope-{{000000..000003}}.tar",
                        "data.val_shards={val}"], {}, "data.train_shards", "matches no file"),
    ("readers-over-shards", [*SHARDS, "data.num_workers=5"], {}, "data.num_workers",
     "1 process(es) x 5 loader worker(s) = 5 readers, but data.train_shards has 4 shard(s)"),
    ("readers-of-the-launch", [*SHARDS, "train.micro_batch_size=8"],
     {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}, "data.num_workers",
     "8 process(es) x 1 loader worker(s) = 8 readers"),
    ("resume-missing", ["train.resume=/nonexistent"], {}, "train.resume", "neither a checkpoints folder"),
    ("resume-other-precision", ["train.resume={root}/bf16_run"], {}, "train.resume",
     "written with train.precision=bf16; this run uses fp32"),
    ("output-not-writable", ["logging.output_dir=/proc/x"], {}, "logging.output_dir", "/proc is not writable"),
    ("three-augment-and-auto-augment", ["data.augment.three_augment=true", "data.augment.auto_augment=rand-m9"], {},
     "data.augment.three_augment", "set data.augment.auto_augment=null"),
    ("dense-task-on-patch-4", ["task=detection", "data.mixup.prob=0", "detection.train_annotations=/no/train.json",
                               "detection.train_images=/no", "detection.val_annotations=/no/val.json",
                               "detection.val_images=/no"], {}, "model.patch_size",
     "the simple feature pyramid assumes patch size 16"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Real shards, and a checkpoint of the demo model written in bf16 (its meta.json, which the
    resume check reads)."""
    root = tmp_path_factory.mktemp("preflight_inputs")
    train, _ = write_jpeg_shards(root, "train", count=32, per_shard=8)
    val, _ = write_jpeg_shards(root, "val", count=8, per_shard=8)
    cfg = config.load(DEMO)
    with torch.device("meta"):
        signature = model_signature(create_classifier(cfg.model), cfg.model.name)
    tag = root / "bf16_run" / "step_5"
    tag.mkdir(parents=True)
    (tag / "meta.json").write_text(json.dumps({**signature, "zero_stage": 0, "world_size": 1, "precision": "bf16",
                                               "step": 5, "epoch": 0}))
    (tag.parent / "latest").write_text("step_5")
    return {"root": str(root), "train": train, "val": val}


def _train(args: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, DEMO, *args], cwd=REPO, env=cpu_env(**environment),
                          capture_output=True, text=True, timeout=300)


_REFUSALS = """
import importlib.util, json, os, sys, traceback
spec = importlib.util.spec_from_file_location("train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
codes = {}
for name, argv, environment, streams in json.loads(sys.argv[2]):
    pid = os.fork()
    if pid == 0:  # a process of its own: its environment, its standard output and error
        os.environ.update(environment)
        for fd, stream in zip((1, 2), streams):
            os.dup2(os.open(stream, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            code = train.main(argv)
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""


@pytest.fixture(scope="module")
def refusals(inputs, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every case of BAD_INPUTS through launch/train.py's main() in a process of its own, each forked
    from one process that imported launch/train.py once (the imports are most of a refusal's time):
    {case: (its exit code and output, the output folder it was given)}."""
    root = tmp_path_factory.mktemp("refusals")
    cases, outputs = [], {}
    for name, overrides, environment, _, _ in BAD_INPUTS:
        out, streams = root / name / "runs", [str(root / f"{name}.stdout"), str(root / f"{name}.stderr")]
        outputs[name] = out, streams
        cases.append([name, [DEMO, f"logging.output_dir={out}", *(o.format(**inputs) for o in overrides)],
                      environment, streams])
    proc = subprocess.run([sys.executable, "-c", _REFUSALS, TRAIN, json.dumps(cases)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.splitlines()[-1])
    return {name: (subprocess.CompletedProcess(name, codes[name], *(Path(s).read_text() for s in streams)), out)
            for name, (out, streams) in outputs.items()}


@pytest.mark.parametrize("case, key, fragment", [(case[0], *case[3:]) for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_before_any_work(case, key, fragment, refusals):
    proc, out = refusals[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]  # no traceback, no warning, no rank prefix
    assert lines[0].startswith(f"error: config key '{key}': "), lines[0]
    assert fragment in lines[0]
    assert not out.exists()  # no run folder (nor the output folder) was created


def test_only_local_rank_0_prints_the_refusal(tmp_path):
    proc = _train([f"logging.output_dir={tmp_path}", "model.depth=0"],
                  {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", "")
    assert not any(tmp_path.iterdir())


def test_submit_runs_the_preflight_with_the_jobs_world_size(inputs, tmp_path):
    overrides = [o.format(**inputs) for o in SHARDS]
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "submit.py"), "--dry-run", "--gpus-per-node", "8",
                           DEMO, *overrides, "train.micro_batch_size=8", f"logging.output_dir={tmp_path}"],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "error: config key 'data.num_workers': 8 process(es) x 1 loader worker(s) = 8 readers" in proc.stderr
    assert "nothing was submitted" in proc.stderr and not any(tmp_path.iterdir())


_TIMER = """
import importlib.util, json, sys, time
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("train", sys.argv[1])
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
imported = time.perf_counter()
refusals = {}
for case in json.loads(sys.argv[2]):
    begin = time.perf_counter()
    assert train.main(case) == 2
    refusals[" ".join(case[1:])] = time.perf_counter() - begin
print(json.dumps({"import_s": imported - start, "refusals_s": refusals}))
"""


def test_time_to_refusal_is_the_import_time(inputs, tmp_path):
    """In one real process: the imports of launch/train.py, then each refusal's own time (config
    load + pre-flight, meta-device model build included)."""
    cases = [[DEMO, f"logging.output_dir={tmp_path}", *(o.format(**inputs) for o in overrides)]
             for _, overrides, environment, _, _ in BAD_INPUTS if not environment]
    proc = subprocess.run([sys.executable, "-c", _TIMER, TRAIN, json.dumps(cases)], cwd=REPO, env=cpu_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    times = json.loads(proc.stdout.splitlines()[-1])
    refusals = times["refusals_s"]
    print(f"\nimports {times['import_s']:.2f} s; refusal after the imports: median "
          f"{statistics.median(refusals.values()):.3f} s, max {max(refusals.values()):.3f} s over {len(refusals)}")
    assert max(refusals.values()) < max(1.0, 0.5 * times["import_s"]), refusals
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- check_run in-process


DISTILLED = ["model.name=anchorformer_tiny_distilled_patch16_224", "loss.distillation=hard",
             "loss.teacher_checkpoint={train_index}"]
"""A distilled run; the teacher's weights file is any existing file (the pre-flight reads none)."""


def _shards_config(inputs: dict[str, str], *overrides: str) -> config.RootConfig:
    return config.load(DEMO, [*(o.format(**inputs) for o in SHARDS), *overrides])


@pytest.mark.parametrize("overrides, key, fragment", [
    (["model.pretrained_checkpoint=/no/weights.safetensors"], "model.pretrained_checkpoint", "not an existing file"),
    (["model.num_classes=5", "data.train_index={train_index}"], "model.num_classes", "fewer than the 10 classes"),
    (["data.train_index={root}/nope-index.json"], "data.train_index", "not an existing file"),
    ([*DISTILLED, "loss.teacher_model=regnety_16"], "loss.teacher_model", "did you mean 'regnety_160'"),
    ([*DISTILLED, "loss.teacher_model=regnety_160", "loss.teacher_kwargs={{depth: 3}}"], "loss.teacher_kwargs",
     "regnety_160 refuses them"),
    (["loss.distillation=hard", "loss.teacher_model=regnety_160", "loss.teacher_checkpoint={train_index}"],
     "loss.distillation", "needs a model with a distillation token"),
    (["train.resume={root}/other_model"], "train.resume", "holds another model"),
    (["logging.output_dir={train_index}"], "logging.output_dir", "is a file"),
    (["model.kwargs={{num_anchor: 16}}"], "model.kwargs.num_anchor", "did you mean 'model.num_anchors'"),
    (["model.name=deit_tiny_patch16_224"], "model.num_anchors", "has no argument 'num_anchors'"),
])
def test_check_run_names_the_key(overrides, key, fragment, inputs):
    other = Path(inputs["root"]) / "other_model"
    if not other.exists():
        (other / "step_1").mkdir(parents=True)
        (other / "step_1" / "meta.json").write_text(json.dumps({"model": "x", "num_params": 1, "param_hash": "0"}))
        (other / "latest").write_text("step_1")
    values = dict(inputs, train_index=str(Path(inputs["root"]) / "train-index.json"))
    with pytest.raises(ConfigError) as info:
        check_run(_shards_config(inputs, *(o.format(**values) for o in overrides)), world_size=1)
    assert info.value.key == key
    assert fragment in str(info.value)


@pytest.mark.parametrize("recipe, key", [("coco_maskrcnn_tiny", "detection.train_annotations"),
                                         ("ade20k_upernet_tiny", "segmentation.root")])
def test_check_run_refuses_missing_dense_data(recipe, key):
    cfg = config.load(REPO / "configs" / f"{recipe}.yaml", ["model.pretrained_checkpoint=null"])
    with pytest.raises(ConfigError, match=f"'{key}': '/datasets/.*' is not an existing"):
        check_run(cfg, world_size=8)


def test_a_valid_run_passes_and_leaves_nothing_behind(inputs, tmp_path):
    cfg = _shards_config(inputs, f"logging.output_dir={tmp_path / 'runs'}", "data.num_workers=4")
    check_run(cfg, world_size=1)  # 4 readers for 4 shards
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("arguments, fragment", [
    (dict(depth=0), "depth must be an integer >= 1"),
    (dict(num_anchors=0), "num_anchors must be an integer >= 1"),
    (dict(embed_dim=100, num_heads=3), "embed_dim=100 must be divisible by num_heads=3"),
    (dict(num_heads=0), "num_heads must be an integer >= 1"),
    (dict(img_size=15, patch_size=4), "img_size=(15, 15) is not divisible by patch_size=(4, 4)"),
])
def test_the_constructor_refuses_impossible_architectures(arguments, fragment):
    with torch.device("meta"), pytest.raises(ValueError) as info:
        AnchorFormer(**arguments)
    assert fragment in str(info.value)

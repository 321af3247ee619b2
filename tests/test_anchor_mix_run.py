"""train.anchor_mix through a run: a forced backend refused before any work where it cannot run;
auto's decisions made before the first step, recorded in every checkpoint, summary.json and
TensorBoard, and pinned again by a resume, which then takes the interrupted run's path."""
from __future__ import annotations

import dataclasses
import json

import pytest
from engine_fixtures import cpu_runtime, logged_texts, synthetic_config, synthetic_task_class

from anchorformer import dist
from anchorformer.config import ConfigError
from anchorformer.engine.preflight import check_run
from anchorformer.engine.trainer import Trainer
from anchorformer.kernels import autotune, backend_calls
from anchorformer.run_folder import CheckpointMeta, RunFolder


@pytest.fixture(autouse=True)
def fresh_decisions(monkeypatch):
    """Each test starts with no decision in the process, and auto as the process default."""
    monkeypatch.setattr(autotune, "_choices", {})
    monkeypatch.setattr(autotune, "_records", {})
    monkeypatch.delenv("ANCHORFORMER_ANCHOR_MIX", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def _fit(cfg) -> Trainer:
    env = dist.detect(environ={}, argv=[], cuda_available=False)
    dist.init(env)
    try:
        trainer = Trainer(cfg, env, task=synthetic_task_class()(cfg, cpu_runtime(env)))
        try:
            trainer.fit()
        finally:
            trainer.close()
        return trainer
    finally:
        dist.shutdown()


def test_a_forced_backend_that_cannot_run_is_refused_before_any_work(tmp_path):
    cfg = synthetic_config(tmp_path, "forced", stage=0, micro=4, anchor_mix="triton")
    with pytest.raises(ConfigError) as refusal:
        check_run(cfg, world_size=1)
    assert refusal.value.key == "train.anchor_mix"
    assert "CUDA" in str(refusal.value) and "use auto" in str(refusal.value)
    assert not RunFolder.of(cfg).root.exists()
    check_run(synthetic_config(tmp_path, "sdpa", stage=0, micro=4, anchor_mix="sdpa"), world_size=1)


def test_auto_decides_before_the_first_step_records_everywhere_and_a_resume_pins_it(tmp_path):
    cfg = synthetic_config(tmp_path, "auto", stage=0, micro=4)
    trainer = _fit(cfg)
    keys = {(entry["train"], entry["source"]) for entry in autotune.decisions()}
    assert keys == {(True, "measured"), (False, "measured")}  # the training and the evaluation shape
    folder = RunFolder.of(cfg)
    summary = json.loads(folder.summary.read_text())
    assert summary["anchor_mix"] == autotune.decisions()
    meta = CheckpointMeta.read(folder.checkpoints.latest())
    assert list(meta.anchor_mix) == autotune.decisions()
    assert "-> " in logged_texts(folder.tensorboard)["anchor_mix"]

    # The resumed run pins what the checkpoint says (sdpa for training here), measures nothing
    # again and runs that backend.
    recorded = [dict(entry, choice="sdpa" if entry["train"] else entry["choice"]) for entry in meta.anchor_mix]
    dataclasses.replace(meta, anchor_mix=tuple(recorded)).write(folder.checkpoints.latest())
    autotune._choices.clear()
    autotune._records.clear()
    before = backend_calls().get("sdpa", 0)
    resumed = synthetic_config(tmp_path, "auto", stage=0, micro=4, resume="auto", max_steps=trainer.step + 2)
    _fit(resumed)
    train_entry = next(entry for entry in autotune.decisions() if entry["train"])
    assert (train_entry["choice"], train_entry["source"]) == ("sdpa", "pinned")
    assert backend_calls().get("sdpa", 0) > before

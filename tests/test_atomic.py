"""Atomic file writes: the destination holds the old content or the new, never a part, and no
temporary file outlives the write."""
import pytest
import torch

from anchorformer.atomic import atomic_output, atomic_torch_save, atomic_write_bytes


def test_a_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "summary.json"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "latest"
    target.write_bytes(b"step-1")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"step-")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"step-1"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]


def test_torch_save_round_trips(tmp_path):
    state = {"step": 3, "weights": torch.arange(4.0)}
    atomic_torch_save(state, tmp_path / "trainer_rank0.pt")
    loaded = torch.load(tmp_path / "trainer_rank0.pt", weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], state["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["trainer_rank0.pt"]

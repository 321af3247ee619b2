"""tools/make_shards.py and the shard writer: every source, exact counts, unchanged image bytes,
byte limits, and re-runs after an interruption that reproduce a clean run's shards."""
import hashlib
import json
import tarfile
from pathlib import Path

import make_shards
import pytest
from data_fixtures import make_jpeg_tree

from anchorformer.data.index import read_index
from anchorformer.data.sources import list_image_folder
from anchorformer.data.writer import plan_shards, write_shards

CLASSES = {"cat": 7, "dog": 5, "eel": 9}


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {member.name: tar.extractfile(member).read() for member in tar}


def _shard_hashes(folder: Path, name: str) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob(f"{name}-*.tar"))}


def test_imagefolder_shards_hold_every_image_unchanged_with_its_label(tmp_path):
    labels = make_jpeg_tree(tmp_path / "tree", CLASSES)
    out = tmp_path / "shards"
    assert make_shards.main(["imagefolder", str(tmp_path / "tree"), "--out", str(out), "--name", "train",
                             "--max-samples", "5", "--quiet"]) == 0
    index = read_index(out / "train-index.json")
    assert index.total == 21 and [entry.samples for entry in index.shards] == [5, 5, 5, 5, 1]
    assert index.classes == ["cat", "dog", "eel"]
    assert json.loads((out / "train-classes.json").read_text()) == {"cat": 0, "dog": 1, "eel": 2}
    seen = {}
    for entry in index.shards:
        members = _tar_members(out / entry.name)
        assert entry.bytes == (out / entry.name).stat().st_size
        assert len(members) == 2 * entry.samples
        for name, data in members.items():
            key, ext = name.rsplit(".", 1)
            if ext == "cls":
                seen[key] = int(data)
            else:
                assert ext == "jpg" and data == (tmp_path / "tree" / f"{key}.jpg").read_bytes()
    assert seen == labels


def test_shuffle_seed_changes_order_not_content(tmp_path):
    make_jpeg_tree(tmp_path / "tree", CLASSES)
    listing = list_image_folder(tmp_path / "tree")
    orders = {}
    for seed in (0, 1):
        write_shards(listing, tmp_path / f"s{seed}", "train", max_samples=100, shuffle_seed=seed, progress=False)
        orders[seed] = [name for name in _tar_members(tmp_path / f"s{seed}" / "train-000000.tar") if name.endswith(".cls")]
    assert orders[0] != orders[1] and sorted(orders[0]) == sorted(orders[1])


def test_max_bytes_bounds_each_shard(tmp_path):
    make_jpeg_tree(tmp_path / "tree", CLASSES, size=48)
    limit = 8 * 1024
    index = write_shards(list_image_folder(tmp_path / "tree"), tmp_path / "out", "train", max_samples=1000,
                         max_bytes=limit, workers=2, progress=False)
    assert index.total == 21 and len(index.shards) > 1
    for entry in index.shards:  # tar pads the archive to whole 10 KiB records at the end
        data_bytes = sum(512 + -(-len(data) // 512) * 512 for data in _tar_members(tmp_path / "out" / entry.name).values())
        assert data_bytes <= limit


def test_rerun_after_interruption_reproduces_clean_shards(tmp_path):
    make_jpeg_tree(tmp_path / "tree", CLASSES)
    listing = list_image_folder(tmp_path / "tree")
    write_shards(listing, tmp_path / "clean", "train", max_samples=4, progress=False)
    clean = _shard_hashes(tmp_path / "clean", "train")

    out = tmp_path / "out"
    victim = Path(plan_shards(listing.samples, 4, shuffle_seed=0)[-1][0].path)  # in the last shard
    content = victim.read_bytes()
    victim.unlink()
    victim.mkdir()  # reading it fails while its shard is written: the run stops there
    with pytest.raises(IsADirectoryError):
        write_shards(listing, out, "train", max_samples=4, progress=False)
    assert not list(out.glob(".*.tmp")) and not (out / "train-index.json").exists()
    written = {path.name: path.stat().st_mtime_ns for path in out.glob("train-*.tar")}
    assert len(written) == len(clean) - 1  # interrupted in the last shard

    victim.rmdir()
    victim.write_bytes(content)
    assert make_shards.main(["imagefolder", str(tmp_path / "tree"), "--out", str(out), "--name", "train",
                             "--max-samples", "4", "--quiet"]) == 0
    assert _shard_hashes(out, "train") == clean
    kept = {name for name, mtime in written.items() if (out / name).stat().st_mtime_ns == mtime}
    assert kept == set(written), "complete shards of the interrupted run must be kept, not rewritten"

    # A re-run with another plan replaces every shard and leaves no stale one behind.
    write_shards(listing, tmp_path / "clean7", "train", max_samples=7, progress=False)
    make_shards.main(["imagefolder", str(tmp_path / "tree"), "--out", str(out), "--name", "train",
                      "--max-samples", "7", "--quiet"])
    assert _shard_hashes(out, "train") == _shard_hashes(tmp_path / "clean7", "train")


def test_synset_tree_follows_class_list_order(tmp_path):
    make_jpeg_tree(tmp_path / "in21k", {"n01440764": 3, "n01443537": 2, "n02102040": 4})
    (tmp_path / "in21k" / "README").write_text("not a synset folder")
    (tmp_path / "synsets.txt").write_text("n02102040\nn01440764\nn01443537\n")
    out = tmp_path / "shards"
    assert make_shards.main(["synsets", str(tmp_path / "in21k"), "--class-list", str(tmp_path / "synsets.txt"),
                             "--out", str(out), "--quiet"]) == 0
    index = read_index(out / "train-index.json")
    assert index.classes == ["n02102040", "n01440764", "n01443537"] and index.total == 9
    labels = {name.split("/")[0]: int(data) for name, data in _tar_members(out / "train-000000.tar").items()
              if name.endswith(".cls")}
    assert labels == {"n02102040": 0, "n01440764": 1, "n01443537": 2}


def test_list_file_source_and_its_errors(tmp_path, capsys):
    make_jpeg_tree(tmp_path / "images", {"a": 2, "b": 1})
    (tmp_path / "train.tsv").write_text("a/a_0.jpg\t3\na/a_1.jpg\t0\n# comment\n\nb/b_0.jpg\t1\n")
    out = tmp_path / "shards"
    assert make_shards.main(["listfile", str(tmp_path / "train.tsv"), "--root", str(tmp_path / "images"),
                             "--out", str(out), "--no-shuffle", "--quiet"]) == 0
    members = _tar_members(out / "train-000000.tar")
    assert [(name, int(data)) for name, data in members.items() if name.endswith(".cls")] == [
        ("a/a_0.cls", 3), ("a/a_1.cls", 0), ("b/b_0.cls", 1)]
    assert read_index(out / "train-index.json").num_classes == 4

    (tmp_path / "bad.tsv").write_text("a/a_0.jpg\tcat\n")
    assert make_shards.main(["listfile", str(tmp_path / "bad.tsv"), "--root", str(tmp_path / "images"),
                             "--out", str(out), "--quiet"]) == 2
    assert "bad.tsv:1: label 'cat' is not a non-negative integer" in capsys.readouterr().err
    assert make_shards.main(["imagefolder", str(tmp_path / "missing"), "--out", str(out), "--quiet"]) == 2
    assert "missing is not a directory" in capsys.readouterr().err


def test_embedded_source_writes_the_validation_digits(tmp_path):
    out = tmp_path / "digits"
    assert make_shards.main(["embedded", "--split", "val", "--image-size", "16", "--out", str(out), "--name", "val",
                             "--max-samples", "100", "--quiet"]) == 0
    index = read_index(out / "val-index.json")
    assert index.total == 297 and index.num_classes == 10 and len(index.shards) == 3


def test_help_documents_every_source_with_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        make_shards.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for source in ("imagefolder", "synsets", "listfile", "embedded"):
        assert f"python tools/make_shards.py {source} " in text
        with pytest.raises(SystemExit):
            make_shards.main([source, "--help"])
        assert "Example: python tools/make_shards.py " + source in capsys.readouterr().out

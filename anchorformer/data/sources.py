"""Inputs that ``tools/make_shards.py`` packs into shards: each source lists its samples (key,
label, image file or bytes) and its class names; nothing is decoded or re-encoded here.

Sources: an ImageFolder tree (``root/<class>/**/<image>``, the ImageNet-1k train/val layout), an
ImageNet-21k-style tree of WordNet synset folders (``root/n01440764/...``), a list file of
``path<TAB>label`` lines, and the embedded digits dataset (see ``embedded.py``)."""
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["IMAGE_EXTENSIONS", "SourceSample", "SourceListing", "list_image_folder", "list_synset_tree",
           "list_file"]

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
"""File suffixes (lower case, no dot) taken as images; other files in a tree are ignored."""

_SYNSET_PATTERN = re.compile(r"^n\d{8}$")


@dataclass(frozen=True)
class SourceSample:
    """One sample to write: a unique ``key`` (no dots), its class ``label``, the image extension
    (``jpg``/``png``/...) and either the image file ``path`` or the encoded image ``data``."""
    key: str
    label: int
    ext: str
    path: str | None = None
    data: bytes | None = None

    def read(self) -> bytes:
        """The image bytes, unchanged from the file (or the bytes held in memory)."""
        if self.data is not None:
            return self.data
        assert self.path is not None, f"sample {self.key} has neither a path nor data"
        with open(self.path, "rb") as f:
            return f.read()

    def size(self) -> int:
        """Size of the image bytes without reading them."""
        return len(self.data) if self.data is not None else os.path.getsize(self.path)


@dataclass(frozen=True)
class SourceListing:
    """Everything a source provides: its samples and the class names, by label."""
    samples: list[SourceSample]
    classes: list[str]


def _extension(path: Path) -> str | None:
    ext = path.suffix[1:].lower()
    if ext not in IMAGE_EXTENSIONS:
        return None
    return "jpg" if ext == "jpeg" else ext


def _key_for(relative: Path) -> str:
    """A webdataset key for a file: its relative path without suffix, dots replaced (webdataset
    splits a member name into key and extension at the first dot of its base name)."""
    return relative.with_suffix("").as_posix().replace(".", "_")


def _images_under(root: Path, class_dir: Path, label: int, keys: dict[str, Path]) -> list[SourceSample]:
    samples, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            ext = _extension(path)
            if ext is None:
                ignored += 1
                continue
            key = _key_for(path.relative_to(root))
            if key in keys:
                raise ValueError(f"{path} and {keys[key]} map to the same shard key {key!r}; "
                                 f"rename one of them (keys ignore the file suffix)")
            keys[key] = path
            samples.append(SourceSample(key=key, label=label, ext=ext, path=str(path)))
    if ignored:
        _logger.info("%s: ignored %d files without an image suffix (%s)", class_dir, ignored,
                     ", ".join(IMAGE_EXTENSIONS))
    return samples


def _class_folder_samples(root: Path, classes: list[str]) -> list[SourceSample]:
    keys: dict[str, Path] = {}
    samples = []
    for label, name in enumerate(classes):
        samples += _images_under(root, root / name, label, keys)
    if not samples:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    return samples


def _require_dir(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image tree {root} is not a directory; pass the folder that holds one "
                         f"sub-folder per class")
    return root


def list_image_folder(root: str | Path) -> SourceListing:
    """List an ImageFolder tree: one sub-folder per class, labels by sorted folder name (the
    torchvision ``ImageFolder`` convention), images found recursively inside each class folder.

    Args:
        root: folder holding one sub-folder per class (e.g. ImageNet-1k ``train/`` or ``val/``).

    Returns:
        The samples, in folder order, and the class names by label.
    """
    root = _require_dir(root)
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; an ImageFolder tree is <root>/<class>/<image>")
    return SourceListing(samples=_class_folder_samples(root, classes), classes=classes)


def list_synset_tree(root: str | Path, class_list: str | Path | None = None) -> SourceListing:
    """List an ImageNet-21k-style tree of WordNet synset folders (``n01440764/...``).

    Args:
        root: folder holding one ``nXXXXXXXX`` folder per synset; other entries are ignored.
        class_list: optional text file with one synset id per line that fixes the label order
            (e.g. the official ImageNet-21k or 1k order); a listed synset without a folder is an
            error, a folder not listed is ignored. Default: sorted synset ids of the folders.

    Returns:
        The samples and the synset ids by label.
    """
    root = _require_dir(root)
    folders = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and _SYNSET_PATTERN.match(entry.name))
    if class_list is None:
        classes = folders
    else:
        classes = [line.strip() for line in Path(class_list).read_text(encoding="utf-8").splitlines() if line.strip()]
        bad = [name for name in classes if not _SYNSET_PATTERN.match(name)]
        if bad:
            raise ValueError(f"{class_list}: {bad[:3]} are not WordNet synset ids (nXXXXXXXX)")
        missing = sorted(set(classes) - set(folders))
        if missing:
            raise ValueError(f"{class_list} lists synsets without a folder under {root}: {missing[:5]} "
                             f"({len(missing)} in all)")
        unlisted = len(set(folders) - set(classes))
        if unlisted:
            _logger.warning("%s: %d synset folders are not in %s and are left out", root, unlisted, class_list)
    if not classes:
        raise ValueError(f"{root} has no synset folders named nXXXXXXXX (e.g. n01440764)")
    return SourceListing(samples=_class_folder_samples(root, classes), classes=classes)


def list_file(path: str | Path, root: str | Path | None = None) -> SourceListing:
    """List the samples of a text file with one ``image_path<TAB>label`` line per image.

    Args:
        path: the list file; blank lines and lines starting with ``#`` are ignored.
        root: folder that relative image paths start from (default: the list file's folder).

    Returns:
        The samples in file order; class names are the label numbers ``0 .. max(label)``.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"list file {path} does not exist")
    root = Path(root) if root is not None else path.parent
    samples, keys = [], {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.rstrip("\n").split("\t")
        where = f"{path}:{number}"
        if len(fields) != 2:
            raise ValueError(f"{where}: expected 'image_path<TAB>label', got {line!r}")
        image, label_text = Path(fields[0]), fields[1].strip()
        if not label_text.isdigit():
            raise ValueError(f"{where}: label {label_text!r} is not a non-negative integer")
        image = image if image.is_absolute() else root / image
        ext = _extension(image)
        if ext is None:
            raise ValueError(f"{where}: {image} has no image suffix ({', '.join(IMAGE_EXTENSIONS)})")
        if not image.is_file():
            raise ValueError(f"{where}: image {image} does not exist (relative paths start at {root})")
        key = _key_for(image.relative_to(root) if image.is_relative_to(root) else Path(image.name))
        if key in keys:
            raise ValueError(f"{where}: {image} has the same shard key {key!r} as line {keys[key]}")
        keys[key] = number
        samples.append(SourceSample(key=key, label=int(label_text), ext=ext, path=str(image)))
    if not samples:
        raise ValueError(f"list file {path} has no 'image_path<TAB>label' lines")
    num_classes = max(sample.label for sample in samples) + 1
    return SourceListing(samples=samples, classes=[str(label) for label in range(num_classes)])

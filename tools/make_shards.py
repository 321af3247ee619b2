#!/usr/bin/env python
"""Pack images into webdataset tar shards {name}-000000.tar ... with an index and a class map.

Each sample is stored as {key}.{jpg,png,...} (the image bytes unchanged) and {key}.cls (the
label). Beside the shards: {name}-index.json (shard names, samples per shard, classes, total; pass
it to the training config) and {name}-classes.json (class name -> label). Re-running the same
command after an interruption keeps the complete shards and rewrites the rest.

Sources:
  imagefolder  an ImageFolder tree, <root>/<class>/**/<image> (ImageNet-1k train/ and val/
               layout); labels by sorted class-folder name
      python tools/make_shards.py imagefolder /data/imagenet/train --out /data/in1k-shards --name train
  synsets      an ImageNet-21k-style tree of WordNet synset folders <root>/nXXXXXXXX/<image>;
               labels by sorted synset id, or by the order of --class-list
      python tools/make_shards.py synsets /data/imagenet21k --class-list synsets.txt \\
          --out /data/in21k-shards --name train --max-bytes 1G --workers 16
  listfile     a text file of 'image_path<TAB>label' lines (relative paths start at --root,
               default the list file's folder)
      python tools/make_shards.py listfile /data/labels/train.tsv --out /data/shards --name train
  embedded     the embedded digits dataset shipped with scikit-learn (1500 train / 297 val images)
      python tools/make_shards.py embedded --split train --image-size 32 --out /tmp/digits --name train
"""
import argparse
import logging
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anchorformer.data.embedded import digits_listing  # noqa: E402
from anchorformer.data.index import class_map_path, index_path  # noqa: E402
from anchorformer.data.sources import SourceListing, list_file, list_image_folder, list_synset_tree  # noqa: E402
from anchorformer.data.writer import write_shards  # noqa: E402

_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _byte_size(text: str) -> int:
    """Parse '500M', '1G', '123456' into bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 1G, 500M or 1048576")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def _listing(args: argparse.Namespace) -> SourceListing:
    if args.source == "imagefolder":
        return list_image_folder(args.root)
    if args.source == "synsets":
        return list_synset_tree(args.root, args.class_list)
    if args.source == "listfile":
        return list_file(args.list, args.root)
    return digits_listing(args.split, args.image_size)


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--name", default="train", help="shard set name: shards are NAME-000000.tar ... (default train)")
    parser.add_argument("--max-samples", type=int, default=10000, help="most samples per shard (default 10000)")
    parser.add_argument("--max-bytes", type=_byte_size, default=None,
                        help="most bytes per shard, e.g. 1G or 500M (default: no limit)")
    parser.add_argument("--shuffle-seed", type=int, default=0,
                        help="seed of the shuffle before sharding (default 0)")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source order instead of shuffling")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per source."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    folder = sources.add_parser("imagefolder", help="ImageFolder tree <root>/<class>/<image> (ImageNet-1k layout)",
                                description="Example: python tools/make_shards.py imagefolder /data/imagenet/val "
                                            "--out /data/in1k-shards --name val --max-samples 5000")
    folder.add_argument("root", type=Path, help="folder with one sub-folder per class")
    synsets = sources.add_parser("synsets", help="ImageNet-21k-style tree of synset folders <root>/nXXXXXXXX/<image>",
                                 description="Example: python tools/make_shards.py synsets /data/imagenet21k "
                                             "--class-list synsets.txt --out /data/in21k-shards --max-bytes 1G "
                                             "--workers 16")
    synsets.add_argument("root", type=Path, help="folder with one nXXXXXXXX folder per synset")
    synsets.add_argument("--class-list", type=Path, default=None,
                         help="file with one synset id per line fixing the label order (default: sorted ids)")
    listed = sources.add_parser("listfile", help="text file of 'image_path<TAB>label' lines",
                                description="Example: python tools/make_shards.py listfile train.tsv "
                                            "--root /data/images --out /data/shards --name train")
    listed.add_argument("list", type=Path, help="the list file")
    listed.add_argument("--root", type=Path, default=None,
                        help="folder relative image paths start at (default: the list file's folder)")
    embedded = sources.add_parser("embedded", help="the embedded digits dataset (scikit-learn, 10 classes)",
                                  description="Example: python tools/make_shards.py embedded --split val "
                                              "--image-size 32 --out /tmp/digits --name val")
    embedded.add_argument("--split", choices=("train", "val"), default="train", help="which split (default train)")
    embedded.add_argument("--image-size", type=int, default=32, help="side of the RGB images in pixels (default 32)")
    for sub in (folder, synsets, listed, embedded):
        _add_output_options(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the shards; user errors are reported in one line with exit status 2."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        listing = _listing(args)
        index = write_shards(listing, args.out, args.name, max_samples=args.max_samples, max_bytes=args.max_bytes,
                             shuffle_seed=None if args.no_shuffle else args.shuffle_seed, workers=args.workers,
                             progress=not args.quiet)
    except ValueError as exn:
        print(f"make_shards: error: {exn}", file=sys.stderr)
        return 2
    print(f"{index.total} samples, {index.num_classes} classes, {len(index.shards)} shards in {args.out}")
    print(f"shards:    {args.out / args.name}-{{000000..{len(index.shards) - 1:06d}}}.tar")
    print(f"index:     {index_path(args.out, args.name)}")
    print(f"class map: {class_map_path(args.out, args.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

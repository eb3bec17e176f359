#!/usr/bin/env python3
"""Save a grid of Sort-of-CLEVR images with their questions and answers, to check the generator by eye.

Loads the dataset exactly as training does (through the cache), so what you see is what
the model sees. Needs matplotlib: ``pip install 'timm-ait[analysis]'``.

    python tools/show_sort_of_clevr.py --split test --num-shown 8 --out sort_of_clevr.png
"""
import argparse
import os
import sys

import numpy as np

from timm_ait.data.sort_of_clevr import SortOfClevr, answer_name, describe_question


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", "--root", dest="root", default=None,
                        help="cache directory (default: $TIMM_AIT_DATA or ~/.cache/timm_ait)")
    parser.add_argument("--split", default="test", choices=("train", "test"))
    parser.add_argument("--num-images", type=int, default=None,
                        help="size of the generated split (default: 9800 train, 200 test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shown", type=int, default=8, help="images in the grid")
    parser.add_argument("--questions-per-image", type=int, default=6,
                        help="questions written under each image, half non-relational, half relational")
    parser.add_argument("--cols", type=int, default=4)
    parser.add_argument("--out", default="sort_of_clevr.png")
    args = parser.parse_args(argv)
    for name in ("cols", "num_shown"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.questions_per_image < 0:
        parser.error(f"--questions-per-image must be >= 0, got {args.questions_per_image}")
    if args.num_images is not None and args.num_images < 1:
        parser.error(f"--num-images must be >= 1, got {args.num_images}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        parser.error(f"--out {args.out!r}: expected a file in an existing folder")
    return args


def questions_to_show(dataset: SortOfClevr, image: int, count: int) -> np.ndarray:
    """Item indices of up to ``count`` questions about ``image``, split evenly between the kinds."""
    items = np.flatnonzero(dataset.image_index == image)
    non_relational = items[~dataset.is_relational[items]][:(count + 1) // 2]
    relational = items[dataset.is_relational[items]][:count // 2]
    return np.concatenate([non_relational, relational])


def main(argv=None):
    args = parse_args(argv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("show_sort_of_clevr.py needs matplotlib: pip install 'timm-ait[analysis]'")

    dataset = SortOfClevr(root=args.root, split=args.split, num_images=args.num_images, seed=args.seed)
    num_shown = min(args.num_shown, dataset.num_images)
    cols = min(args.cols, num_shown)
    rows = -(-num_shown // cols)
    # Each cell: the image on top, then one text line per question below it.
    cell_height = 2.6 + 0.17 * args.questions_per_image
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, cell_height * rows), squeeze=False)
    for ax in axes.flat[num_shown:]:
        ax.axis("off")
    for image, ax in zip(range(num_shown), axes.flat):
        ax.imshow(dataset.images[image], interpolation="nearest")
        ax.set_xticks([])  # keep the frame: the background is white like the page
        ax.set_yticks([])
        ax.set_title(f"{args.split} image {image}", fontsize=9)
        lines = [f"{'R' if dataset.is_relational[item] else 'N'}: "
                 f"{describe_question(dataset.questions[item])} -> {answer_name(dataset.answers[item])}"
                 for item in questions_to_show(dataset, image, args.questions_per_image)]
        ax.text(0.5, -0.03, "\n".join(lines), transform=ax.transAxes, ha="center", va="top", fontsize=7,
                family="monospace")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({num_shown} images from {dataset.cache_path})")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Image preprocessing benchmark: vlmlab's ImageProcessor vs transformers' CLIPImageProcessor.

Both turn the same decoded PIL images into CLIP pixel values (RGB, shortest edge to 224 bicubic,
centre crop 224, rescale 1/255, normalise with CLIP's mean and std). Two image sets:

* photos: the scikit-image sample photographs (astronaut 512x512, coffee 400x600, chelsea 300x451,
  rocket 427x640, ...), all resized and cropped;
* scenes: 224-px synthetic scenes (`vlmlab.scenes`), the training input of scenes-clip, where resize
  and crop are no-ops and rescale + normalise is all the work.

Each set goes through each implementation as one batch call, `--repeats` times after a warm-up
(the two alternating, so that both see the same machine load);
the median time per image is reported with the ratio transformers / vlmlab (above 1: vlmlab is
faster), and the largest |difference| between the two outputs. transformers' processor is the PIL
"slow" one (`use_fast=False`; the fast one needs torchvision, which has no CPU wheel here).

Usage (from the repository root, with the venv active):

    python benchmarks/preprocess.py --markdown
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from lm_decode import machine_info, markdown_table, vlmlab_provenance, wait_for_quiet


def photos() -> list:
    from PIL import Image
    from skimage import data

    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina"]
    return [Image.fromarray(getattr(data, n)()).convert("RGB") for n in names]


def scenes(n: int) -> list:
    from vlmlab.data.scenes import SceneConfig, generate_sample

    config = SceneConfig(width=224, height=224)
    return [generate_sample("caption_short", i, "train", config).images[0] for i in range(n)]


def timed(fns: list, repeats: int) -> tuple[list, list[list[float]]]:
    """Each fn once (warm-up, outputs kept for the comparison), then `repeats` rounds of timing each
    fn in turn, so that both see the same machine load."""
    outs = [fn() for fn in fns]
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return outs, times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--scenes", type=int, default=32, help="how many scenes (default 32)")
    ap.add_argument("--wait-quiet", type=float, default=60, metavar="S",
                    help="wait up to S s for other processes to use under 0.25 cores first (0: don't)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import CLIPImageProcessor

    from vlmlab.vision.preprocess import ImageProcessor

    transformers.logging.set_verbosity_error()
    ours, theirs = ImageProcessor.clip(224), CLIPImageProcessor(use_fast=False)
    if args.wait_quiet > 0:
        wait_for_quiet(0.25, args.wait_quiet)
    rows = []
    for name, images in (("photos", photos()), ("scenes", scenes(args.scenes))):
        (a, b), (t_ours, t_theirs) = timed(
            [lambda: ours(images), lambda: theirs(images, return_tensors="pt")["pixel_values"]], args.repeats)
        diff = (a - b).abs().max().item()
        ms_ours = statistics.median(t_ours) / len(images) * 1e3
        ms_theirs = statistics.median(t_theirs) / len(images) * 1e3
        sizes = sorted({f"{im.width}x{im.height}" for im in images})
        rows.append([name, str(len(images)), ", ".join(sizes) if len(sizes) < 4 else f"{len(sizes)} sizes",
                     f"{ms_ours:.2f}", f"{ms_theirs:.2f}", f"{ms_theirs / ms_ours:.2f}", f"{diff:.1e}"])
        print(f"{name}: vlmlab {ms_ours:.2f} ms/image, transformers {ms_theirs:.2f} ms/image", file=sys.stderr)

    m, code = machine_info(), vlmlab_provenance(None)
    headers = ["images", "n", "sizes", "vlmlab ms/image", "transformers ms/image", "hf/vl", "max abs diff"]
    print(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} "
          f"({torch.get_num_threads()} threads), transformers {m['transformers']}; "
          f"vlmlab commit {code.get('commit')}; median of {args.repeats} batch calls after one warm-up\n")
    if args.markdown:
        print(markdown_table(headers, rows))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="CLIP preprocessing (decoded PIL images -> pixel values)")
        for h in headers:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        Console().print(table)


if __name__ == "__main__":
    main()

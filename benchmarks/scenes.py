#!/usr/bin/env python
"""Synthetic-scene throughput: samples per second of task generation + rendering.

A sample is `SceneStream(split, config=SceneConfig(width=S, height=S)).sample(n)`: the default
task mix (captions, VQA, OCR, grounding, pointing, multi-image, multi-turn), the scene graph(s)
built for the answer, and every image rendered to a PIL image (1 or 2 per sample). PNG encoding
and file writing (what `vlmlab data synth` adds) are not included.

Modes:
* single: one process, one core (numpy here never uses threads), samples 0..N-1 in order;
* loader: `torch.utils.data.DataLoader(SceneStream(...), batch_size=32, num_workers=W,
  collate_fn=list)`, timed from the first batch (worker start-up excluded) over N samples.

Usage (repository root, venv active):

    python benchmarks/scenes.py                       # 224 and 448, single and 2 workers, markdown table
    python benchmarks/scenes.py --sizes 224 --n 3000 --per-task
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

from vlmlab.data.scenes import TASKS, SceneConfig, SceneStream, TaskMix, generate_sample


def single(size: int, n: int, preset: str) -> float:
    stream = SceneStream("train", config=SceneConfig.preset(preset, width=size, height=size))
    for i in range(20):  # warm caches (glyphs, kind pools)
        stream.sample(10**6 + i)
    t = time.perf_counter()
    for i in range(n):
        stream.sample(i)
    return n / (time.perf_counter() - t)


def loader(size: int, n: int, workers: int, preset: str) -> float:
    stream = SceneStream("train", config=SceneConfig.preset(preset, width=size, height=size))
    dl = torch.utils.data.DataLoader(stream, batch_size=32, num_workers=workers, collate_fn=list,
                                     prefetch_factor=4 if workers else None)
    it = iter(dl)
    next(it)  # workers started and warm
    got, t = 0, time.perf_counter()
    while got < n:
        got += len(next(it))
    rate = got / (time.perf_counter() - t)
    del it
    return rate


def per_task(size: int, n: int, preset: str) -> dict[str, float]:
    config = SceneConfig.preset(preset, width=size, height=size)
    out = {}
    for task in TASKS:
        t = time.perf_counter()
        for i in range(n):
            generate_sample(task, i, "train", config).images
        out[task] = (time.perf_counter() - t) / n * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 448])
    ap.add_argument("--n", type=int, default=2000, help="samples per measurement (halved at 448 and above)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="measurements per row; the median is reported")
    ap.add_argument("--preset", default="medium", choices=["easy", "medium", "hard"])
    ap.add_argument("--per-task", action="store_true", help="also ms per sample of each task (single process)")
    args = ap.parse_args()

    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average before: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print(f"task mix: {TaskMix()!r}", file=sys.stderr)
    rows = []
    for size in args.sizes:
        n = args.n if size < 448 else args.n // 2
        for mode in ("single", f"DataLoader, {args.workers} workers"):
            rates = []
            for _ in range(args.repeats):
                rates.append(single(size, n, args.preset) if mode == "single" else loader(size, n, args.workers, args.preset))
                print(f"  {size} {mode}: {rates[-1]:.0f} samples/s", file=sys.stderr)
            rows.append((size, mode, statistics.median(rates), min(rates), max(rates)))

    print(f"| image size | mode | samples/s (median of {args.repeats}) | range | ms / sample |")
    print("|---|---|---:|---:|---:|")
    for size, mode, med, lo, hi in rows:
        print(f"| {size}x{size} | {mode} | {med:.0f} | {lo:.0f}-{hi:.0f} | {1e3 / med:.2f} |")
    if args.per_task:
        size = args.sizes[0]
        print(f"\n| task ({size}x{size}, single process) | ms / sample |")
        print("|---|---:|")
        for task, ms in per_task(size, max(50, args.n // 20), args.preset).items():
            print(f"| {task} | {ms:.2f} |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

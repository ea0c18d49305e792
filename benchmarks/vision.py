#!/usr/bin/env python
"""Vision benchmark: vlmlab vs transformers on CLIP image encoding and contrastive training.

Two measurements, both from the same random weights: a `transformers.CLIPModel` built with a fixed
seed and saved (`save_pretrained`) to a temporary folder, which each library then loads.

* encode: images/s of a ViT-B/16-sized CLIP image tower (hidden 768, 12 layers, 12 heads, MLP 3072,
  patch 16, 224 px, quick_gelu) plus its projection to 512: vlmlab's `CLIPNet.encode_image`
  (loaded as `vlmlab.load` loads a CLIP folder) vs transformers' `CLIPVisionModelWithProjection`
  (`.image_embeds`), under `torch.inference_mode()`, float32 and bfloat16 (both `.to(bfloat16)`),
  batch 1 and 32. The outputs of the first call are compared (max |diff|).
* train: steps/s of a small CLIP (vision 256 wide, 4 layers, patch 16, 224 px; text 256 wide,
  4 layers, 77 positions, CLIP's vocabulary; batch 32) trained contrastively with AdamW: vlmlab's
  `CLIPNet(..., features=True)` + `ContrastiveLoss("infonce")` vs `CLIPModel(..., return_loss=True)`,
  the same loop around both (zero_grad, forward + loss [under bfloat16 autocast], backward, AdamW
  step), float32 and bfloat16 autocast. The first step's losses are compared.

Every (part, dtype, batch, implementation) runs in a fresh subprocess (so no two share allocator or
oneDNN state): load, warm up, then `--repeats` timed calls; the median is reported, with the ratio
vlmlab / transformers (above 1: vlmlab is faster). On a shared machine the driver waits for other
processes to go quiet and measures disturbed configurations again (as `lm_decode.py` does).

Usage (from the repository root, with the venv active):

    python benchmarks/vision.py --markdown --json /tmp/vision.json    # everything
    python benchmarks/vision.py --only encode --dtype bfloat16 --batch 32
    python benchmarks/vision.py --quick                                # tiny sizes: checks the script works

See benchmarks/README.md for the method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Machine-level helpers shared with the decode benchmark (this folder is on sys.path when a script
# in it runs).
from lm_decode import (
    cpu_seconds,
    fmt,
    loadavg,
    machine_info,
    markdown_table,
    peak_rss_mib,
    rss_mib,
    system_cpu_s,
    vlmlab_provenance,
    wait_for_quiet,
    worker_main,
)
from lm_decode import run_worker as run_lm_decode_worker

IMPLS = ("vlmlab", "transformers")
DTYPES = ("float32", "bfloat16")
PARTS = ("encode", "train")
RESULT_TAG = "@@RESULT@@ "
SEED_WEIGHTS, SEED_PIXELS, SEED_TEXT = 0, 1, 2

# HF CLIPModel configs (config.json layout). The encode checkpoint's text tower is a token one: only
# the image tower and its projection run.
TINY_TEXT = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=77)
SIZES = {
    "full": {
        "encode": dict(
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               patch_size=16, image_size=224, hidden_act="quick_gelu"),
            text_config=TINY_TEXT, projection_dim=512, batches=[1, 32], warmup=1,
        ),
        "train": dict(
            vision_config=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                               patch_size=16, image_size=224, hidden_act="quick_gelu"),
            text_config=dict(vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                             num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu"),
            projection_dim=256, batch=32, warmup=2,
        ),
        "repeats": {"encode": 5, "train": 10},
    },
    "quick": {
        "encode": dict(
            vision_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                               patch_size=16, image_size=64, hidden_act="quick_gelu"),
            text_config=TINY_TEXT, projection_dim=32, batches=[1, 4], warmup=1,
        ),
        "train": dict(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               patch_size=16, image_size=32, hidden_act="quick_gelu"),
            text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu"),
            projection_dim=32, batch=8, warmup=2,
        ),
        "repeats": {"encode": 3, "train": 3},
    },
}
# CLIP's optimiser settings (vlmlab's TrainConfig defaults), identical for both implementations.
ADAMW = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)


def hf_clip_config(part: dict) -> dict:
    """The CLIPModel config dict: CLIP's special tokens at the top of the vocabulary (transformers'
    CLIPTextConfig defaults to eos_token_id=2, which selects the legacy pooling). The towers' configs
    repeat projection_dim, as published CLIP configs do: CLIPVisionModelWithProjection reads it there."""
    dim = part["projection_dim"]
    text = dict(part["text_config"], projection_dim=dim)
    vocab = text["vocab_size"]
    text.update(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    return {"vision_config": dict(part["vision_config"], projection_dim=dim), "text_config": text, "projection_dim": dim}


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ---------------------------------------------------------------------------------------------


def worker_checkpoint(spec: dict) -> dict:
    """Build a random transformers CLIPModel with a fixed seed and save it to spec['dir']."""
    import torch
    import transformers
    from transformers import CLIPConfig, CLIPModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(SEED_WEIGHTS)
    model = CLIPModel(CLIPConfig(**spec["config"])).eval()
    model.save_pretrained(spec["dir"])
    vision = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("vision_model.", "visual_projection.")))
    return {"params": sum(p.numel() for p in model.parameters()), "vision_params": vision}


def load_vlmlab_clip(folder: str):
    """CLIPNet from an HF CLIP folder, the way `vlmlab.load` builds a CLIP model's network (that also
    wants a tokenizer, which these random checkpoints lack)."""
    from vlmlab.checkpoints.hf import read_config, read_safetensors
    from vlmlab.models.clip import CLIPConfig, CLIPNet

    net = CLIPNet(CLIPConfig.from_hf(read_config(folder)))
    tensors, origin = read_safetensors(folder)
    net.load_hf_tensors(tensors, origin)
    return net


def timed_calls(fn, warmup: int, repeats: int) -> tuple[object, list[dict]]:
    """Run fn `warmup` times, then `repeats` timed times; return (first warm-up result, timed runs).

    Each run records its wall time and fn's result when it is a number (a loss). The CPU other
    processes (plus hypervisor steal) used meanwhile is measured over all timed calls together, in
    cores: /proc/stat counts in 10 ms ticks, too coarse for one millisecond call.
    """
    first = None
    for i in range(warmup):
        out = fn()
        if i == 0:
            first = out
    runs = []
    own0, sys0, w0 = cpu_seconds(), system_cpu_s(), time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        runs.append({"s": time.perf_counter() - t, **({"loss": out} if isinstance(out, float) else {})})
    own1, sys1, w1 = cpu_seconds(), system_cpu_s(), time.perf_counter()
    load = {"cpu_cores_busy": (own1 - own0) / (w1 - w0)}  # this process
    if sys0 is not None and sys1 is not None:
        load["others_cores"] = (max(0.0, (sys1[0] - sys0[0]) - (own1 - own0)) + (sys1[1] - sys0[1])) / (w1 - w0)
    return first, runs, load


def worker_encode(spec: dict) -> dict:
    import torch

    impl, dtype, batch = spec["impl"], getattr(torch, spec["dtype"]), spec["batch"]
    rss0, t = rss_mib(), time.perf_counter()
    if impl == "vlmlab":
        net = load_vlmlab_clip(spec["checkpoint"]).eval().to(dtype)
        encode = net.encode_image
        extra = {}
    else:
        import transformers
        from transformers import CLIPVisionModelWithProjection

        transformers.logging.set_verbosity_error()
        model = CLIPVisionModelWithProjection.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval().to(dtype)
        encode = lambda x: model(pixel_values=x).image_embeds  # noqa: E731
        extra = {"attn_implementation": model.config._attn_implementation}
    load_s = time.perf_counter() - t
    rss1 = rss_mib()
    size = spec["image_size"]
    gen = torch.Generator().manual_seed(SEED_PIXELS)
    pixels = torch.randn(batch, 3, size, size, generator=gen).to(dtype)
    load_before = loadavg()
    with torch.inference_mode():
        first, runs, load = timed_calls(lambda: encode(pixels), spec["warmup"], spec["repeats"])
    for r in runs:
        r["images_per_s"] = batch / r["s"]
    return {
        **summarise(runs, "images_per_s", load),
        "runs": runs,
        "output": first.float().flatten().tolist(),
        "output_shape": list(first.shape),
        "load_s": load_s,
        "rss_before_load_mib": rss0,
        "rss_after_load_mib": rss1,
        **process_stats(load_before),
        **extra,
    }


def process_stats(load_before: list[float] | None) -> dict:
    """A worker's peak RSS (VmHWM: including loading), the load average before timing and now, its threads."""
    import torch

    return {"peak_rss_mib": peak_rss_mib(), "loadavg_before": load_before, "loadavg_after": loadavg(),
            "threads": torch.get_num_threads()}


def text_batch(batch: int, positions: int, vocab: int, generator):
    """CLIP-tokenizer-like ids: begin-of-text, random tokens, end-of-text, padded with end-of-text
    (CLIP's pad token) to `positions`; random lengths; mask 1 up to and including end-of-text."""
    import torch

    bos, eos = vocab - 2, vocab - 1
    ids = torch.full((batch, positions), eos, dtype=torch.long)
    mask = torch.zeros((batch, positions), dtype=torch.long)
    lengths = torch.randint(3, positions + 1, (batch,), generator=generator)
    for row, n in enumerate(lengths.tolist()):
        ids[row, 0] = bos
        ids[row, 1:n - 1] = torch.randint(0, vocab - 2, (n - 2,), generator=generator)
        mask[row, :n] = 1
    return ids, mask


def worker_train(spec: dict) -> dict:
    import torch

    impl, batch, bf16 = spec["impl"], spec["batch"], spec["dtype"] == "bfloat16"
    cfg = spec["config"]
    rss0, t = rss_mib(), time.perf_counter()
    extra = {}
    if impl == "vlmlab":
        from vlmlab.train.losses import ContrastiveLoss

        model = load_vlmlab_clip(spec["checkpoint"])
        loss_fn = ContrastiveLoss("infonce")

        def forward(pixels, ids, mask):
            img, txt = model(pixels, ids, mask, features=True)
            return loss_fn(img, txt, model.logit_scale)
    else:
        import transformers
        from transformers import CLIPModel

        transformers.logging.set_verbosity_error()
        model = CLIPModel.from_pretrained(spec["checkpoint"], dtype=torch.float32)
        extra["attn_implementation"] = model.config._attn_implementation

        def forward(pixels, ids, mask):
            return model(input_ids=ids, pixel_values=pixels, attention_mask=mask, return_loss=True).loss
    load_s = time.perf_counter() - t
    size = cfg["vision_config"]["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(SEED_PIXELS))
    text = cfg["text_config"]
    ids, mask = text_batch(batch, text["max_position_embeddings"], text["vocab_size"],
                           torch.Generator().manual_seed(SEED_TEXT))

    result = time_training(model, lambda: forward(pixels, ids, mask), ADAMW, bf16, spec["warmup"], spec["repeats"],
                           "steps_per_s", 1)
    return {**result, "load_s": load_s, "rss_before_load_mib": rss0, **extra}


def time_training(model, loss_of, adamw: dict, bf16: bool, warmup: int, repeats: int, rate: str,
                  per_step: float) -> dict:
    """Train all of `model`'s parameters with AdamW(**adamw), the same loop for any library: zero_grad,
    `loss_of()` (under bfloat16 autocast when bf16), backward, step. `warmup` steps, then `repeats`
    timed ones, each with `rate` = per_step / its wall time; the first (warm-up) step's loss."""
    import torch

    model.train().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, **adamw)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of()
        loss.backward()
        optimizer.step()
        return float(loss)

    load_before = loadavg()
    first_loss, runs, load = timed_calls(step, warmup, repeats)
    for r in runs:
        r[rate] = per_step / r["s"]
    return {
        **summarise(runs, rate, load),
        "runs": runs,
        "first_loss": first_loss,
        "params": sum(p.numel() for p in params),
        "optimizer": {**adamw, "foreach": optimizer.defaults.get("foreach"), "fused": optimizer.defaults.get("fused")},
        **process_stats(load_before),
    }


def summarise(runs: list[dict], rate: str, load: dict) -> dict:
    return {
        rate: statistics.median(r[rate] for r in runs),
        f"{rate}_min": min(r[rate] for r in runs),
        f"{rate}_max": max(r[rate] for r in runs),
        "others_cores": load.get("others_cores") or 0.0,
        "cpu_cores_busy": load["cpu_cores_busy"],
    }


WORKERS = {"checkpoint": worker_checkpoint, "encode": worker_encode, "train": worker_train}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def run_worker(spec: dict) -> dict:
    """Run one worker of this script in a fresh interpreter (lm_decode's driver)."""
    return run_lm_decode_worker(spec, __file__)


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) for x, y in zip(a, b, strict=True)), default=0.0)


def pair_rows(results: list[dict], part: str, rate: str) -> list[dict]:
    """One row per (dtype, batch) with both implementations and the ratio vlmlab / transformers."""
    rows = []
    for key in dict.fromkeys((r["dtype"], r["batch"]) for r in results if r["part"] == part):
        got = {r["impl"]: r for r in results if r["part"] == part and (r["dtype"], r["batch"]) == key}
        vl, hf = got.get("vlmlab"), got.get("transformers")
        row = {"dtype": key[0], "batch": key[1], "vlmlab": vl, "transformers": hf, "ratio": None}
        if vl and hf:
            row["ratio"] = vl[rate] / hf[rate]
        rows.append(row)
    return rows


def rate_cells(r: dict | None, rate: str, spec: str) -> list[str]:
    if r is None:
        return ["-", "-"]
    return [format(r[rate], spec), f"{format(r[f'{rate}_min'], spec)}–{format(r[f'{rate}_max'], spec)}"]


ENCODE_HEADERS = ["dtype", "batch", "vlmlab img/s", "(min–max)", "transformers img/s", "(min–max)", "vl/hf",
                  "max abs diff", "max abs output", "peak RSS MiB vl / hf"]
TRAIN_HEADERS = ["precision", "batch", "vlmlab steps/s", "(min–max)", "transformers steps/s", "(min–max)", "vl/hf",
                 "loss step 1 vl / hf", "peak RSS MiB vl / hf"]


def encode_cells(row: dict) -> list[str]:
    vl, hf = row["vlmlab"], row["transformers"]
    return [
        row["dtype"], str(row["batch"]),
        *rate_cells(vl, "images_per_s", ".2f"), *rate_cells(hf, "images_per_s", ".2f"),
        fmt(row["ratio"], ".2f"),
        fmt(row.get("max_abs_diff"), ".2e"), fmt(row.get("max_abs_output"), ".2f"),
        f"{fmt(vl and vl['peak_rss_mib'], '.0f')} / {fmt(hf and hf['peak_rss_mib'], '.0f')}",
    ]


def train_cells(row: dict) -> list[str]:
    vl, hf = row["vlmlab"], row["transformers"]
    return [
        "fp32" if row["dtype"] == "float32" else "bf16 autocast", str(row["batch"]),
        *rate_cells(vl, "steps_per_s", ".3f"), *rate_cells(hf, "steps_per_s", ".3f"),
        fmt(row["ratio"], ".2f"),
        f"{fmt(vl and vl['first_loss'], '.5f')} / {fmt(hf and hf['first_loss'], '.5f')}",
        f"{fmt(vl and vl['peak_rss_mib'], '.0f')} / {fmt(hf and hf['peak_rss_mib'], '.0f')}",
    ]


def describe(part: dict) -> str:
    v, t = part["vision_config"], part["text_config"]
    vision = (f"ViT hidden {v['hidden_size']}, {v['num_hidden_layers']} layers, {v['num_attention_heads']} heads, "
              f"MLP {v['intermediate_size']}, patch {v['patch_size']}, {v['image_size']} px, {v['hidden_act']}")
    text = (f"text hidden {t['hidden_size']}, {t['num_hidden_layers']} layers, {t['max_position_embeddings']} "
            f"positions, vocab {t['vocab_size']}")
    return f"{vision}; {text}; projection {part['projection_dim']}"


def report_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of each part that ran."""
    tables = []
    if "encode" in report["parts"]:
        p = report["parts"]["encode"]
        title = (f"image encoding, images/s, median of {p['repeats']} calls after {p['warmup']} warm-up "
                 f"(vlmlab CLIPNet.encode_image vs transformers CLIPVisionModelWithProjection; "
                 f"{describe(p['config'])}; {p['vision_params'] / 1e6:.1f}M parameters)")
        tables.append((title, ENCODE_HEADERS, [encode_cells(r) for r in p["rows"]]))
    if "train" in report["parts"]:
        p = report["parts"]["train"]
        title = (f"contrastive training, steps/s, median of {p['repeats']} steps after {p['warmup']} warm-up "
                 f"(CLIPNet + ContrastiveLoss('infonce') vs CLIPModel(return_loss=True), AdamW; "
                 f"{describe(p['config'])}; {p['params'] / 1e6:.1f}M parameters)")
        tables.append((title, TRAIN_HEADERS, [train_cells(r) for r in p["rows"]]))
    return tables


# ---------------------------------------------------------------------------------------------
# driver pieces shared with vlm.py
# ---------------------------------------------------------------------------------------------


def parse_run_args(ap: argparse.ArgumentParser, argv: list[str] | None, workers: dict, parts: tuple[str, ...],
                   repeats_default: str, extra_dtypes: tuple[str, ...] = ()) -> argparse.Namespace | None:
    """Add the options on parts, implementations, dtypes (DTYPES plus the script's `extra_dtypes`), repeats,
    quick mode, machine quietness, the code under test and the output, and parse (args.parts, args.dtypes:
    what to run); in a worker process (--_worker), run its measurement and return None."""
    ap.add_argument("--only", choices=parts, help=f"run only one part ({' or '.join(parts)})")
    ap.add_argument("--impl", choices=[*IMPLS, "both"], default="both")
    ap.add_argument("--dtype", choices=[*DTYPES, *extra_dtypes, "all"], default="all",
                    help="train: bfloat16 means float32 weights under bfloat16 autocast")
    ap.add_argument("--repeats", type=int,
                    help=f"timed calls per configuration, median reported (default: {repeats_default})")
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, few calls, no waiting for a quiet machine: checks that the script works")
    ap.add_argument("--busy-threshold", type=float, default=0.25, help="cores (default 0.25)")
    ap.add_argument("--wait-quiet", type=float, metavar="S",
                    help="before each measurement, wait up to S seconds for other processes to use less than "
                    "--busy-threshold cores (0: don't wait; default 60, --quick: 0)")
    ap.add_argument("--busy-retries", type=int,
                    help="measure a configuration again (keeping the quietest) when other processes used more "
                    "than --busy-threshold cores during its timed calls (default 2, --quick: 0)")
    ap.add_argument("--vlmlab-src", metavar="DIR",
                    help="benchmark the vlmlab package in DIR (e.g. a `git archive` export of another commit's "
                    "src/) instead of the installed one")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables instead of rich ones")
    ap.add_argument("--json", metavar="OUT", help="write all results (every timed call) to this JSON file")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        worker_main(args._worker, workers)
        return None
    if args.repeats is not None and args.repeats < 1:
        ap.error("--repeats must be at least 1")
    args.vlmlab_src = os.path.abspath(args.vlmlab_src) if args.vlmlab_src else None
    args.dtypes = (*DTYPES, *extra_dtypes) if args.dtype == "all" else (args.dtype,)
    args.parts = (args.only,) if args.only else parts
    return args


def measure(spec: dict, rate: str, args: argparse.Namespace, run) -> dict:
    """`run(spec)` (a configuration's worker) after waiting for a quiet machine, and again while other
    processes used more than --busy-threshold cores during its timed calls; the quietest attempt."""
    wait = args.wait_quiet if args.wait_quiet is not None else 0 if args.quick else 60
    retries = args.busy_retries if args.busy_retries is not None else 0 if args.quick else 2
    attempts: list[dict] = []
    while len(attempts) <= retries and (not attempts or attempts[-1]["others_cores"] > args.busy_threshold):
        if attempts:
            print("  machine busy, measuring again", file=sys.stderr)
        if wait > 0 and (busy := wait_for_quiet(args.busy_threshold, wait)) >= args.busy_threshold:
            print(f"  (still {busy:.2f} cores busy after waiting {wait:.0f} s)", file=sys.stderr)
        print(f"{spec['worker']:6s} {spec['impl']:12s} {spec['dtype']:8s} batch {spec['batch']} ...",
              end=" ", file=sys.stderr, flush=True)
        r = run(spec)
        print(f"{r[rate]:.3f} {rate.replace('_per_s', '/s')} (load {r['load_s']:.1f}s, peak RSS "
              f"{r['peak_rss_mib']:.0f} MiB, others used {r['others_cores']:.2f} cores)", file=sys.stderr)
        attempts.append(r)
    best = min(attempts, key=lambda a: a["others_cores"])
    return {**best, "part": spec["worker"], "impl": spec["impl"], "dtype": spec["dtype"], "batch": spec["batch"],
            "attempts": len(attempts)}


def new_report(script: str, argv: list[str] | None, args: argparse.Namespace, parts: dict, results: list) -> dict:
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "vlmlab_code": vlmlab_provenance(args.vlmlab_src),
        "quick": args.quick,
        "busy_threshold": args.busy_threshold,
        "parts": parts,
        "results": results,
    }


def print_tables(report: dict, tables: list[tuple[str, list[str], list[list[str]]]], markdown: bool) -> None:
    """The machine and code, each (title, headers, rows) table, and warnings (busy machine, --quick)."""
    m, code = report["machine"], report.get("vlmlab_code", {})
    lines = [
        f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
        f"transformers {m['transformers']}",
        f"vlmlab code: {code.get('src')}"
        + (f" (commit {code['commit']}" if code.get("commit") else "")
        + (", with uncommitted changes in src/" if code.get("uncommitted_changes_in_src") else "")
        + (")" if code.get("commit") else ""),
    ]
    busy = [r for r in report["results"] if r["others_cores"] > report["busy_threshold"]]
    footer = []
    if busy:
        footer.append("WARNING: other processes used CPU during "
                      + ", ".join(f"{r['part']}/{r['impl']}/{r['dtype']}/b{r['batch']}" for r in busy)
                      + " (see others_cores in --json); re-run those on a quiet machine")
    if report["quick"]:
        footer.append("--quick: tiny models, the numbers mean nothing")
    if markdown:
        print("\n".join(lines) + "\n")
        for title, headers, rows in tables:
            print(f"{title}\n")
            print(markdown_table(headers, rows) + "\n")
        if footer:
            print("\n".join(footer))
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print_tables(report, tables, markdown=True)
        return
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print("\n".join(lines))
    for title, headers, rows in tables:
        table = Table(title=title)
        for i, h in enumerate(headers):
            table.add_column(h, justify="left" if i < 2 else "right")
        for cells in rows:
            table.add_row(*cells)
        console.print(table)
    for line in footer:
        console.print(line)


def finish(report: dict, tables: list, args: argparse.Namespace, started: float, json_parts: dict) -> None:
    """Print the tables and the run time; write --json, with `json_parts` as its "parts"."""
    print_tables(report, tables, args.markdown)
    report["wall_s"] = time.perf_counter() - started
    print(f"\nfull run took {report['wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps({**report, "parts": json_parts}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", help="encode batch sizes (default 1 32; --quick: 1 4)")
    args = parse_run_args(ap, argv, WORKERS, PARTS, "encode 5, train 10; --quick 3")
    if args is None:
        return

    started = time.perf_counter()
    sizes = SIZES["quick" if args.quick else "full"]
    impls = IMPLS if args.impl == "both" else (args.impl,)

    results: list[dict] = []
    report_parts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vlmlab-bench-vision-") as tmp:
        for part in args.parts:
            cfg = sizes[part]
            folder = str(Path(tmp) / part)
            hf_cfg = hf_clip_config(cfg)
            print(f"building the random {part} checkpoint (transformers CLIPModel, seed {SEED_WEIGHTS}) ...",
                  file=sys.stderr)
            ckpt = run_worker({"worker": "checkpoint", "config": hf_cfg, "dir": folder})
            repeats = args.repeats or sizes["repeats"][part]
            common = {"checkpoint": folder, "repeats": repeats, "warmup": cfg["warmup"], "vlmlab_src": args.vlmlab_src}
            if part == "encode":
                batches = args.batch or cfg["batches"]
                for dtype in args.dtypes:
                    for batch in batches:
                        for impl in impls:  # back to back, so they see similar machine load
                            spec = {"worker": "encode", "impl": impl, "dtype": dtype, "batch": batch,
                                    "image_size": cfg["vision_config"]["image_size"], **common}
                            results.append(measure(spec, "images_per_s", args, run_worker))
                rows = pair_rows(results, "encode", "images_per_s")
                for row in rows:
                    vl, hf = row["vlmlab"], row["transformers"]
                    if vl and hf:
                        row["max_abs_diff"] = max_abs_diff(vl["output"], hf["output"])
                        row["max_abs_output"] = max(abs(x) for x in hf["output"])
                        print(f"encode {row['dtype']} batch {row['batch']}: max |vlmlab - transformers| = "
                              f"{row['max_abs_diff']:.3e} (outputs up to {row['max_abs_output']:.3f})", file=sys.stderr)
            else:
                batches = [cfg["batch"]]
                for dtype in args.dtypes:
                    for impl in impls:
                        spec = {"worker": "train", "impl": impl, "dtype": dtype, "batch": cfg["batch"],
                                "config": hf_cfg, **common}
                        results.append(measure(spec, "steps_per_s", args, run_worker))
                rows = pair_rows(results, "train", "steps_per_s")
                for row in rows:
                    vl, hf = row["vlmlab"], row["transformers"]
                    if vl and hf:
                        row["first_loss_abs_diff"] = abs(vl["first_loss"] - hf["first_loss"])
                        print(f"train {row['dtype']}: first-step loss vlmlab {vl['first_loss']:.6f}, transformers "
                              f"{hf['first_loss']:.6f} (|diff| {row['first_loss_abs_diff']:.2e})", file=sys.stderr)
                        if vl["params"] != hf["params"]:
                            print(f"WARNING: vlmlab trains {vl['params']} parameters, transformers {hf['params']}",
                                  file=sys.stderr)
            report_parts[part] = {
                "config": hf_cfg, "repeats": repeats, "warmup": cfg["warmup"], "batches": batches,
                "params": ckpt["params"], "vision_params": ckpt["vision_params"],
                "rows": rows,
            }
            if part == "train":
                report_parts[part]["optimizer"] = {**ADAMW, "betas": list(ADAMW["betas"])}

    for r in results:
        r.pop("output", None)  # compared above; too large for the report
    report = new_report("vision.py", argv, args, report_parts, results)
    # rows without their copies of the per-implementation results (those are in "results")
    parts_json = {name: {**p, "rows": [{k: v for k, v in row.items() if k not in IMPLS} for row in p["rows"]]}
                  for name, p in report_parts.items()}
    finish(report, report_tables(report), args, started, parts_json)

if __name__ == "__main__":
    main()

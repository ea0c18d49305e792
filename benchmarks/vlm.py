#!/usr/bin/env python
"""Generative VLM benchmark: vlmlab vs transformers on a LLaVA, answering about images and training.

Both libraries run the same weights, from one Hugging Face LLaVA folder (float32) each loads:

* ask: by default scenes-smol v0's architecture (196 image features; v1's pixel shuffle is a vlmlab
  extension transformers cannot load, so the like-for-like comparison keeps 196), `vlmlab.assemble("scenes-clip",
  "smollm2", image_token="<empty_output>", vision_feature_layer=-1)` (scenes-clip's ViT, 224 px,
  patch 16; SmolLM2-135M; a new mlp2x_gelu projector), saved with `.save()`; `--model DIR` takes
  any saved LLaVA folder instead. One 224-px scene image per prompt, a question of exactly 32
  tokens, exactly 32 new greedy tokens (no stop tokens), float32 and bfloat16:
    - batch 1 latency: vlmlab's `model.ask(question, [image])` end to end (preprocessing, chat
      template, generation, detokenisation), vlmlab's generation loop alone on prepared inputs
      (`prepare` ids + pixel_values -> `vlmlab.infer.batching.Batch`), and
      transformers' `LlavaForConditionalGeneration.generate` on the same prepared ids and pixels;
    - batch 8 throughput (8 images, new tokens/s over all sequences): the same three, batched
      (vlmlab: `_run` with 8 prompts, the batched form of `ask`; Batch on prepared rows; generate on the
      left-padded batch with its attention mask).
  The greedy tokens of both libraries are compared (leading tokens that agree).
  The `int4` rows are vlmlab with `quantization="int4"`: the model saved as parts (vision tower +
  projector, language model named "smollm2") and loaded with the GGUF's 4-bit layer weights kept in
  4 bits (bfloat16 activations). Those codes are the weights transformers runs, dequantized; its
  bfloat16 row is their peer (the ratio column).
* train: samples/s of the tiny-scenes recipe's model (`new_llava(**recipe["model"]["new"])`,
  saved and loaded by both): vlmlab's `next_token_step` vs transformers' `model(..., labels=).loss`,
  the same loop around both (zero_grad, forward + loss [under bfloat16 autocast], backward, AdamW
  step), on identical batches from `ChatBatcher` + `sample_source` (the recipe's data), batch 32,
  fp32 and bf16 autocast. The first step's losses are compared.

Every (part, dtype, batch, implementation) runs in a fresh subprocess: load, warm up, then
`--repeats` timed calls; the median is reported with the ratio vlmlab / transformers of the rates
(above 1: vlmlab is faster). Machine helpers come from lm_decode.py, timing helpers from vision.py.

Usage (from the repository root, with the venv active):

    python benchmarks/vlm.py --markdown --json /tmp/vlm.json       # everything
    python benchmarks/vlm.py --only ask --dtype bfloat16 --batch 1
    python benchmarks/vlm.py --only ask --model runs/scenes-smol/model
    python benchmarks/vlm.py --quick                                 # tiny sizes: checks the script works

See benchmarks/README.md for the method.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Helpers shared with the other benchmarks (this folder is on sys.path when a script in it runs).
from lm_decode import INT4, PEER_DTYPE, fmt, loadavg, rss_mib
from lm_decode import run_worker as run_lm_decode_worker
from vision import finish, measure, new_report, parse_run_args, process_stats, summarise, time_training, timed_calls

PARTS = ("ask", "train")
ASK_IMPLS = ("vlmlab ask", "vlmlab", "transformers")  # "vlmlab ask": end to end, from PIL images and text
TRAIN_IMPLS = ("vlmlab", "transformers")
IMAGE_TASK, IMAGE_SPLIT = "count", "test"  # images: generate_sample(IMAGE_TASK, seed, IMAGE_SPLIT), seeds 0..B-1
RECIPE = "tiny-scenes"
TRAIN_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")  # of a ChatBatcher batch
# The question: the shortest word-prefix of this with exactly --question-tokens tokens.
BASE_QUESTION = (
    "How many shapes are in this picture, which colours do they have, where is each one placed, and which two "
    "of them are the closest to each other? Then describe the background in a few plain words and say whether "
    "any of the shapes carries a written word."
)
SIZES = {
    "full": {"ask": dict(batches=[1, 8], question_tokens=32, new_tokens=32, repeats=5, warmup=1),
             "train": dict(batch=32, repeats=10, warmup=2)},
    # --quick: the tiny-scenes model (64 px, 64 wide, 2 layers) stands in for the assembled one
    "quick": {"ask": dict(batches=[1, 2], question_tokens=8, new_tokens=8, repeats=2, warmup=1),
              "train": dict(batch=8, repeats=3, warmup=2)},
}


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ---------------------------------------------------------------------------------------------


def scene_images(n: int) -> list:
    from vlmlab.data.scenes.tasks import generate_sample

    return [generate_sample(IMAGE_TASK, seed, IMAGE_SPLIT).images[0] for seed in range(n)]


def question_of_length(tokenizer, n: int) -> str:
    """The shortest word-prefix of BASE_QUESTION (optionally with "?") that has exactly n tokens."""
    words = BASE_QUESTION.split()
    for k in range(1, len(words) + 1):
        base = " ".join(words[:k]).rstrip(",.")
        for q in (base, base + "?"):
            if len(tokenizer.encode(q, add_special_tokens=False)) == n:
                return q
    raise SystemExit(f"could not build a question of exactly {n} tokens")


def ask_prompt(question: str) -> str:
    """What `ask` turns a one-image question into."""
    from vlmlab.infer.vlm import IMAGE_MARKER

    return IMAGE_MARKER + "\n" + question


def describe_net(net) -> dict:
    v, t = net.cfg.vision, net.cfg.text
    return {
        "params": sum(p.numel() for p in net.parameters()),
        "vision": f"ViT hidden {v.hidden_size}, {v.num_hidden_layers} layers, {v.image_size} px, patch {v.patch_size}",
        "text": f"Llama hidden {t.hidden_size}, {t.num_hidden_layers} layers, vocab {t.vocab_size}",
        "projector": net.cfg.projector,
    }


def worker_prepare_ask(spec: dict) -> dict:
    """The LLaVA folder both libraries load, and the prepared inputs (ids, mask, pixels) of the batch."""
    import torch
    from safetensors.torch import save_file

    import vlmlab
    from vlmlab.api import PARTS_FIELD, save_parts
    from vlmlab.train.vlm import load_recipe, new_llava

    folder, parts = spec["folder"], None  # parts: a parts folder of the same model (int4 rows), if any
    if spec["model"]:
        config = json.loads((Path(spec["model"]) / "config.json").read_text())
        model = vlmlab.load(spec["model"])
        if PARTS_FIELD in config:  # transformers cannot read a parts folder: write the whole model
            model.save(folder)
            parts = str(Path(spec["model"]).resolve())
        else:
            folder = str(Path(spec["model"]).resolve())
    else:
        if spec["quick"]:
            model = new_llava(**load_recipe(RECIPE)["model"]["new"])
        else:
            model = vlmlab.assemble("scenes-clip", "smollm2", image_token="<empty_output>", vision_feature_layer=-1)
            parts = spec["parts"]
            save_parts(model, parts, "smollm2")
        model.save(folder)
    question = question_of_length(model.tokenizer, spec["question_tokens"])
    batch = spec["batch"]
    ids, extra = model._prepare([ask_prompt(question)] * batch, system=None, chat=True,
                                images=[[im] for im in scene_images(batch)])
    width = max(len(row) for row in ids)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for r, row in enumerate(ids):  # left padding, as generation wants
        input_ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    save_file({"input_ids": input_ids, "attention_mask": mask, "pixel_values": extra["pixel_values"].float()},
              spec["inputs"])
    return {"folder": folder, "parts": parts, "question": question, "prompt_tokens": width, "pad_id": pad,
            "image_features": model.features_per_image(extra["pixel_values"]), **describe_net(model.net)}


def worker_ask(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    impl, batch, n = spec["impl"], spec["batch"], spec["new_tokens"]
    dtype = getattr(torch, spec["dtype"])
    inputs = {k: v[:batch] for k, v in load_file(spec["inputs"]).items()}
    rss0, t = rss_mib(), time.perf_counter()
    extra = {}
    if impl == "transformers":
        import transformers
        from transformers import LlavaForConditionalGeneration

        transformers.logging.set_verbosity_error()
        model = LlavaForConditionalGeneration.from_pretrained(spec["folder"], dtype=dtype).eval()
        extra["attn_implementation"] = model.config._attn_implementation
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        width = inputs["input_ids"].shape[1]
        # exactly n greedy tokens, as lm_decode.py forces them: min = max new tokens
        options = dict(do_sample=False, temperature=None, top_p=None, top_k=None, max_new_tokens=n,
                       min_new_tokens=n, pad_token_id=spec["pad_id"])

        def run() -> list[list[int]]:
            with torch.inference_mode():
                return model.generate(**inputs, **options)[:, width:].tolist()
    else:
        import vlmlab
        from vlmlab.infer.batching import Batch, Row

        if spec["dtype"] == INT4:
            model = vlmlab.load(spec["parts"], dtype="bfloat16", quantization="int4")
        else:
            model = vlmlab.load(spec["folder"], dtype=spec["dtype"])
        getattr(model, "pack", lambda: None)()  # vlmlab packs at the first generation (older: on load)
        extra["onednn_packed"] = bool(model.packed)
        images = scene_images(batch)
        prompt = ask_prompt(spec["question"])
        if impl == "vlmlab ask" and batch == 1:
            def run() -> list[list[int]]:
                result = model.ask(spec["question"], images, max_new_tokens=n, stop_token_ids=())
                if result.prompt_tokens != spec["prompt_tokens"]:
                    raise SystemExit(f"ask's prompt has {result.prompt_tokens} tokens, "
                                     f"expected {spec['prompt_tokens']}")
                return [result.token_ids]
        elif impl == "vlmlab ask":  # the batched form of ask (what it runs for one prompt)
            def run() -> list[list[int]]:
                *_, results = model._run([prompt] * batch, system=None, chat=True, stop=None,
                                         kwargs={"max_new_tokens": n, "stop_token_ids": ()},
                                         images=[[im] for im in images])
                return [r.token_ids for r in results]
        else:  # generation alone, on inputs prepared beforehand
            prepared = [model.prepare(prompt, [im]) for im in images]
            expected = [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]
            if [ids for ids, _ in prepared] != expected:
                raise SystemExit("vlmlab's prepared ids differ from the benchmark's inputs")
            cfg = model.generation_config(max_new_tokens=n, stop_token_ids=())

            def run() -> list[list[int]]:
                rows = [Row(ids, cfg, pixels) for ids, pixels in prepared]
                for _ in Batch(model).run(rows):
                    pass
                return [row.tokens for row in rows]
    load_s, rss1, load_before = time.perf_counter() - t, rss_mib(), loadavg()
    tokens, runs, load = timed_calls(run, spec["warmup"], spec["repeats"])
    if any(len(row) != n for row in tokens):
        raise SystemExit(f"expected {n} new tokens per row, got {[len(row) for row in tokens]}")
    for r in runs:
        r["tokens_per_s"] = batch * n / r["s"]
    return {
        **summarise(runs, "tokens_per_s", load),
        "latency_s": statistics.median(r["s"] for r in runs),
        "runs": runs,
        "tokens": tokens,
        "load_s": load_s,
        "rss_before_load_mib": rss0,
        "rss_after_load_mib": rss1,
        **process_stats(load_before),
        **extra,
    }


def worker_prepare_train(spec: dict) -> dict:
    """The tiny recipe's model saved as a LLaVA folder, and the training batches, saved for both."""
    from safetensors.torch import save_file

    from vlmlab.train.vlm import ChatBatcher, _stage_config, load_recipe, new_llava, sample_source

    recipe = load_recipe(RECIPE)
    stage = recipe["stages"][0]
    cfg = _stage_config(stage)
    model = new_llava(**recipe["model"]["new"])
    model.save(spec["folder"])
    source = sample_source(stage["data"], seed=cfg.seed)
    batcher = ChatBatcher(model, stage.get("max_length"), stage.get("system"))
    size, tensors = spec["batch"], {}
    for step in range(spec["steps"]):
        batch = batcher([source(step * size + i) for i in range(size)])
        for key in TRAIN_INPUTS:
            tensors[f"{step}.{key}"] = batch[key].contiguous()
    save_file(tensors, spec["batches"])
    return {"recipe": recipe["origin"], "data": stage["data"], "precision": cfg.precision,
            "optimizer": {"lr": cfg.lr, "betas": list(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay},
            "tokens_per_sample": tensors["0.input_ids"].shape[1], **describe_net(model.net)}


def worker_train(spec: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    impl, bf16 = spec["impl"], spec["dtype"] == "bfloat16"
    stored = load_file(spec["batches"])
    batches = [{key: stored[f"{step}.{key}"] for key in TRAIN_INPUTS} for step in range(spec["steps"])]
    rss0, t = rss_mib(), time.perf_counter()
    extra = {}
    if impl == "vlmlab":
        import vlmlab
        from vlmlab.train.vlm import next_token_step

        model = vlmlab.load(spec["folder"]).net  # float32: not packed

        def forward(batch):
            return next_token_step(model, batch)[0]
    else:
        import transformers
        from transformers import LlavaForConditionalGeneration

        transformers.logging.set_verbosity_error()
        model = LlavaForConditionalGeneration.from_pretrained(spec["folder"], dtype=torch.float32)
        extra["attn_implementation"] = model.config._attn_implementation

        def forward(batch):
            return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                         attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    load_s = time.perf_counter() - t
    steps = iter(batches)
    adamw = {**spec["optimizer"], "betas": tuple(spec["optimizer"]["betas"])}
    result = time_training(model, lambda: forward(next(steps)), adamw, bf16, spec["warmup"], spec["repeats"],
                           "samples_per_s", spec["batch"])
    return {**result, "load_s": load_s, "rss_before_load_mib": rss0, **extra}


WORKERS = {"prepare_ask": worker_prepare_ask, "ask": worker_ask, "prepare_train": worker_prepare_train,
           "train": worker_train}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def run_worker(spec: dict) -> dict:
    """Run one worker of this script in a fresh interpreter (lm_decode's driver)."""
    return run_lm_decode_worker(spec, __file__)


def same_leading(a: list[list[int]], b: list[list[int]]) -> int:
    """Leading tokens that agree, in the row where they agree least."""
    return min(next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), min(len(ra), len(rb)))
               for ra, rb in zip(a, b))


def with_ratios(results: list[dict], part: str, rate: str) -> list[dict]:
    """The part's results, each with the ratio of its rate to transformers' (same dtype and batch)."""
    rows = [r for r in results if r["part"] == part]
    peer = {(r["dtype"], r["batch"]): r for r in rows if r["impl"] == "transformers"}
    for r in rows:
        hf = peer.get((PEER_DTYPE[r["dtype"]], r["batch"]))
        r["ratio"] = None
        if hf is None or r is hf:
            continue
        r["ratio"] = r[rate] / hf[rate]
        if "tokens" in r:
            r["same_tokens"] = same_leading(r["tokens"], hf["tokens"])
        if "first_loss" in r:
            r["first_loss_diff"] = r["first_loss"] - hf["first_loss"]
    return rows


ASK_HEADERS = ["impl", "dtype", "batch", "latency s", "(min–max)", "new tok/s", "vl/hf", "same tokens",
               "peak RSS MiB"]
TRAIN_HEADERS = ["impl", "precision", "batch", "samples/s", "(min–max)", "vl/hf", "loss step 1", "loss − hf",
                 "peak RSS MiB"]


def ask_cells(r: dict, new_tokens: int) -> list[str]:
    times = [x["s"] for x in r["runs"]]
    return [r["impl"], r["dtype"], str(r["batch"]), f"{r['latency_s']:.3f}", f"{min(times):.3f}–{max(times):.3f}",
            f"{r['tokens_per_s']:.1f}", fmt(r["ratio"], ".2f"),
            f"{r['same_tokens']}/{new_tokens}" if "same_tokens" in r else "-", f"{r['peak_rss_mib']:.0f}"]


def train_cells(r: dict) -> list[str]:
    return [r["impl"], "fp32" if r["dtype"] == "float32" else "bf16 autocast", str(r["batch"]),
            f"{r['samples_per_s']:.1f}", f"{r['samples_per_s_min']:.1f}–{r['samples_per_s_max']:.1f}",
            fmt(r["ratio"], ".2f"), f"{r['first_loss']:.5f}", fmt(r.get("first_loss_diff"), "+.1e"),
            f"{r['peak_rss_mib']:.0f}"]


def ask_title(p: dict) -> str:
    return (f"ask: {p['model']} ({p['params'] / 1e6:.1f}M parameters; {p['vision']}; {p['text']}); prompt "
            f"{p['prompt_tokens']} tokens ({p['image_features']} image features, question of {p['question_tokens']} "
            f"tokens: {p['question']!r}), {p['new_tokens']} new greedy tokens; median of {p['repeats']} calls after "
            f"{p['warmup']} warm-up. vlmlab ask: end to end from image and text; vlmlab: Batch.run on prepared "
            f"ids + pixels; transformers: generate on the same. vl/hf: tokens/s ratio (above 1: vlmlab faster)")


def train_title(p: dict) -> str:
    return (f"train: the {RECIPE} recipe's model ({p['params'] / 1e6:.2f}M parameters; {p['vision']}; {p['text']}), "
            f"next_token_step vs LlavaForConditionalGeneration(labels=).loss, AdamW (lr {p['optimizer']['lr']}); "
            f"samples/s, median of {p['repeats']} steps after {p['warmup']} warm-up, {p['tokens_per_sample']} tokens "
            "per sample in step 1")


def report_tables(report: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    parts = report["parts"]
    tables = []
    if "ask" in parts:
        ask = parts["ask"]
        tables.append((ask_title(ask), ASK_HEADERS, [ask_cells(r, ask["new_tokens"]) for r in ask["rows"]]))
    if "train" in parts:
        tables.append((train_title(parts["train"]), TRAIN_HEADERS, [train_cells(r) for r in parts["train"]["rows"]]))
    return tables


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", help="ask batch sizes (default 1 8; --quick: 1 2)")
    ap.add_argument("--model", metavar="DIR", help="ask: benchmark this LLaVA folder (default: the assembled "
                    "scenes-clip + smollm2 model, random projector)")
    ap.add_argument("--question-tokens", type=int, help="ask: tokens of the question (default 32; --quick: 8)")
    ap.add_argument("--new-tokens", type=int, help="ask: new tokens per sequence (default 32; --quick: 8)")
    args = parse_run_args(ap, argv, WORKERS, PARTS, "ask 5, train 10; --quick: ask 2, train 3",
                          extra_dtypes=(INT4,))
    if args is None:
        return

    started = time.perf_counter()
    sizes = SIZES["quick" if args.quick else "full"]

    def impls_of(names: tuple[str, ...]) -> list[str]:
        return [i for i in names if args.impl == "both" or i.split()[0] == args.impl]

    results: list[dict] = []
    report_parts: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="vlmlab-bench-vlm-") as tmp:
        if "ask" in args.parts:
            cfg = sizes["ask"]
            batches = args.batch or cfg["batches"]
            new_tokens = args.new_tokens or cfg["new_tokens"]
            question_tokens = args.question_tokens or cfg["question_tokens"]
            model = args.model or (f"the {RECIPE} recipe's model (random weights)" if args.quick
                                   else "assembled scenes-clip + smollm2 (random projector)")
            print(f"preparing the ask model and inputs: {model} ...", file=sys.stderr)
            inputs = str(Path(tmp) / "ask-inputs.safetensors")
            prep = run_worker({"worker": "prepare_ask", "folder": str(Path(tmp) / "ask-model"), "inputs": inputs,
                               "parts": str(Path(tmp) / "ask-parts"),
                               "model": args.model, "quick": args.quick, "batch": max(batches),
                               "question_tokens": question_tokens, "vlmlab_src": args.vlmlab_src})
            print(f"question ({question_tokens} tokens): {prep['question']!r}; prompt {prep['prompt_tokens']} tokens",
                  file=sys.stderr)
            common = {"worker": "ask", "folder": prep["folder"], "parts": prep["parts"], "inputs": inputs,
                      "question": prep["question"], "prompt_tokens": prep["prompt_tokens"], "pad_id": prep["pad_id"],
                      "new_tokens": new_tokens, "repeats": args.repeats or cfg["repeats"], "warmup": cfg["warmup"],
                      "vlmlab_src": args.vlmlab_src}
            if INT4 in args.dtypes and prep["parts"] is None:
                print("int4 rows skipped: the model is not a parts folder over a GGUF language model", file=sys.stderr)
            for dtype in args.dtypes:
                if dtype == INT4 and prep["parts"] is None:
                    continue
                for batch in batches:
                    for impl in impls_of(ASK_IMPLS):  # back to back, so they see similar machine load
                        if dtype == INT4 and impl == "transformers":
                            continue  # its peer is transformers' bfloat16 row
                        spec = {**common, "impl": impl, "dtype": dtype, "batch": batch}
                        results.append(measure(spec, "tokens_per_s", args, run_worker))
            report_parts["ask"] = {
                **prep, "model": model, "question_tokens": question_tokens, "new_tokens": new_tokens,
                "batches": batches,
                "images": f"generate_sample({IMAGE_TASK!r}, seed, {IMAGE_SPLIT!r}), seeds 0..{max(batches) - 1}",
                "repeats": common["repeats"], "warmup": cfg["warmup"],
                "rows": with_ratios(results, "ask", "tokens_per_s"),
            }
            for r in report_parts["ask"]["rows"]:
                if "same_tokens" in r and r["impl"] != "transformers":
                    print(f"ask {r['impl']} {r['dtype']} batch {r['batch']}: first {r['same_tokens']} of {new_tokens} "
                          "greedy tokens agree with transformers (worst row)", file=sys.stderr)
        if "train" in args.parts:
            cfg = sizes["train"]
            repeats = args.repeats or cfg["repeats"]
            spec = {"folder": str(Path(tmp) / "train-model"), "batches": str(Path(tmp) / "train-batches.safetensors"),
                    "batch": cfg["batch"], "steps": cfg["warmup"] + repeats, "vlmlab_src": args.vlmlab_src}
            print(f"preparing the {RECIPE} model and {spec['steps']} batches of {cfg['batch']} ...", file=sys.stderr)
            prep = run_worker({**spec, "worker": "prepare_train"})
            for dtype in (d for d in args.dtypes if d != INT4):  # training has no int4 mode
                for impl in impls_of(TRAIN_IMPLS):
                    config = {**spec, "worker": "train", "impl": impl, "dtype": dtype, "optimizer": prep["optimizer"],
                              "repeats": repeats, "warmup": cfg["warmup"]}
                    results.append(measure(config, "samples_per_s", args, run_worker))
            rows = with_ratios(results, "train", "samples_per_s")
            report_parts["train"] = {**prep, "batch": cfg["batch"], "repeats": repeats, "warmup": cfg["warmup"],
                                     "rows": rows}
            for r in rows:
                if r.get("first_loss_diff") is not None and r["impl"] != "transformers":
                    print(f"train {r['dtype']}: first-step loss vlmlab {r['first_loss']:.6f}, vlmlab - transformers "
                          f"{r['first_loss_diff']:+.2e}", file=sys.stderr)
            if len({r["params"] for r in rows}) > 1:
                print(f"WARNING: the implementations train different parameter counts: "
                      f"{ {r['impl']: r['params'] for r in rows} }", file=sys.stderr)

    report = new_report("vlm.py", argv, args, report_parts, results)
    # the parts' rows are the results themselves: in the JSON once, under "results"
    parts_json = {name: {k: v for k, v in p.items() if k != "rows"} for name, p in report_parts.items()}
    finish(report, report_tables(report), args, started, parts_json)


if __name__ == "__main__":
    main()

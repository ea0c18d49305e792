"""`vlmlab` entry point: parses arguments, dispatches to a subcommand, turns errors into messages.

Every user-caused error is a `VlmlabError`: printed as one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from vlmlab.checkpoints.resolve import DEFAULT_LM, DEFAULT_VLM
from vlmlab.errors import InputError, VlmlabError


def _generate(args: argparse.Namespace) -> int:
    import vlmlab

    lm = vlmlab.load(args.model, dtype=args.dtype, quantization=args.quantization)
    options = dict(
        system=args.system,
        chat=args.chat,
        stop=args.stop,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    if args.json:
        result = lm.generate(args.prompt, **options)
        print(json.dumps(result.to_dict(), ensure_ascii=False))
        return 0
    for delta in lm.stream(args.prompt, **options):
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _generation_options(args: argparse.Namespace) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _vlm(args: argparse.Namespace):
    import vlmlab
    from vlmlab.infer.vlm import VisionLanguageModel

    model = vlmlab.load(args.model, dtype=args.dtype, quantization=args.quantization)
    if not isinstance(model, VisionLanguageModel):
        raise InputError(f"{args.model} is not a vision-language model (use `vlmlab generate` for text-only models)")
    return model


def _print_answer(result, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"text": result.text, "token_ids": result.token_ids,
                          "boxes": [[round(v, 1) for v in b] for b in result.boxes or []],
                          "points": [[round(v, 1) for v in p] for p in result.points or []]}, ensure_ascii=False))
    else:
        print(result.text)


def _ask(args: argparse.Namespace) -> int:
    model = _vlm(args)
    _print_answer(model.ask(args.question, args.image or [], system=args.system, **_generation_options(args)), args.json)
    return 0


def _caption(args: argparse.Namespace) -> int:
    model = _vlm(args)
    _print_answer(model.ask(args.prompt, [args.image], **_generation_options(args)), args.json)
    return 0


def _chat(args: argparse.Namespace) -> int:
    """A multi-turn chat on stdin: `/image PATH` attaches an image to the next message."""
    model = _vlm(args)
    messages: list[dict] = []
    images: list = []
    pending: list = []
    print("vlmlab chat: type a message; '/image PATH' attaches an image, '/reset' starts over, Ctrl-D quits.",
          file=sys.stderr)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            messages, images, pending = [], [], []
            continue
        if line.startswith("/image "):
            from vlmlab.vision.preprocess import load_image

            try:
                pending.append(load_image(line.removeprefix("/image ").strip()))
            except VlmlabError as e:
                print(f"vlmlab: error: {e}", file=sys.stderr)
            continue
        content = "<image>" * len(pending) + ("\n" if pending else "") + line
        messages.append({"role": "user", "content": content})
        images += pending
        pending = []
        result = model.ask(messages, images, system=args.system, **_generation_options(args))
        print(result.text, flush=True)
        messages.append({"role": "assistant", "content": result.text})
    return 0


def _explain(args: argparse.Namespace) -> int:
    from vlmlab.infer.explain import explain_to_file

    explanation = explain_to_file(_vlm(args), args.question, args.image, args.out, **_generation_options(args))
    _print_answer(explanation.result, args.json)
    print(f"attention map written to {args.out}", file=sys.stderr)
    return 0


DEMO_TASKS = ("count", "color", "shape", "spatial", "ocr_word", "ground", "point", "caption_short")


def _demo(args: argparse.Namespace) -> int:
    """One test-split scene per task, asked and drawn (true locations green, answers red)."""
    from vlmlab.eval.harness import evaluate, example_grid

    report = evaluate(_vlm(args), split="test", n=1, tasks=list(DEMO_TASKS), max_new_tokens=args.max_new_tokens)
    for p in report.predictions:
        question = p.sample.turns[p.turn - 1].text.replace("<image>", "").strip()
        print(f"[{p.answer.task}] Q: {question}\n  A: {p.text}")
    example_grid(report.predictions, len(DEMO_TASKS)).save(args.out)
    print(f"demo written to {args.out}", file=sys.stderr)
    return 0


def _train(args: argparse.Namespace) -> int:
    """`vlmlab train --recipe NAME|FILE --out DIR` (the `clip` subcommand has its own function)."""
    from vlmlab.train.vlm import train_recipe

    if args.recipe is None or args.recipe_out is None:
        raise InputError("give a subcommand (`vlmlab train clip ...`) or `--recipe NAME|FILE --out DIR`")
    from vlmlab.train.trainer import distributed_teardown

    train_recipe(args.recipe, args.recipe_out, resume=args.resume_recipe, parallel=args.parallel)
    distributed_teardown()
    print(f"model written to {Path(args.recipe_out) / 'model'}")
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    """``WxH`` (or one number for a square) -> (width, height)."""
    w, _, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h or w)
    except ValueError:
        raise InputError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 224x224") from None
    return width, height


def _data_synth(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vlmlab.data.llava_json import write_llava_json
    from vlmlab.data.pairs import write_pairs
    from vlmlab.data.scenes import SceneConfig, TaskMix, generate_sample, image_text_pair, split_seed

    if args.n < 1:
        raise InputError(f"--n {args.n}: expected at least 1 sample")
    if args.format == "pairs" and args.tasks is not None:
        raise InputError("--tasks applies to --format llava; --format pairs writes image-caption pairs")
    width, height = _parse_size(args.size)
    config = SceneConfig.preset(args.preset, width=width, height=height)
    mix = TaskMix.parse(args.tasks) if args.tasks else TaskMix()
    split_seed(args.split, args.seed + args.n - 1)  # the whole range must lie in the split

    counts: dict[str, int] = {}
    n_images = 0

    def samples():
        nonlocal n_images
        for seed in range(args.seed, args.seed + args.n):
            task = mix.pick(split_seed(args.split, seed))
            counts[task] = counts.get(task, 0) + 1
            sample = generate_sample(task, seed, args.split, config)
            n_images += sample.n_images
            yield sample

    def pairs():
        for seed in range(args.seed, args.seed + args.n):
            yield image_text_pair(seed, args.split, config)

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                        console=Console(stderr=True), transient=True)
    with progress:
        bar = progress.add_task(f"synth {args.split}", total=args.n)

        def tracked(items):
            for item in items:
                yield item
                progress.advance(bar)

        if args.format == "pairs":
            path = write_pairs(tracked(pairs()), args.out)
        else:
            path = write_llava_json(tracked(samples()), args.out)
    what = "image-caption pairs" if args.format == "pairs" else f"samples, {n_images} images"
    print(f"wrote {args.n} {what} ({args.split}, seeds {args.seed}-{args.seed + args.n - 1}, "
          f"{width}x{height}, preset {args.preset}) to {path}")
    if counts:
        print("tasks: " + ", ".join(f"{t} {n}" for t, n in sorted(counts.items())))
    return 0


def _dual_encoder(name: str):
    import vlmlab

    model = vlmlab.load(name)
    if getattr(model, "kind", None) != "dual-encoder":
        raise InputError(f"model {name!r} is a {getattr(model, 'kind', type(model).__name__)}, not a dual encoder "
                         "(CLIP / SigLIP); embed and classify need one")
    return model


def _embed(args: argparse.Namespace) -> int:
    model = _dual_encoder(args.model)
    if (args.image is None) == (args.text is None):
        raise InputError("give exactly one of --image FILE or --text TEXT")
    emb = model.embed_image([args.image]) if args.image is not None else model.embed_text([args.text])
    vector = emb[0].tolist()
    if args.json:
        print(json.dumps({"embedding": vector, "dim": len(vector)}))
    else:
        print(f"{len(vector)}-d, L2-normalised: " + " ".join(f"{v:.4f}" for v in vector[:8]) + " ...")
    return 0


def _classify(args: argparse.Namespace) -> int:
    model = _dual_encoder(args.model)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    templates = args.template or ["a photo of a {}."]
    probs = model.classify([args.image], labels, templates=templates)[0].tolist()
    ranked = sorted(zip(labels, probs), key=lambda lp: -lp[1])
    if args.json:
        print(json.dumps({"label": ranked[0][0], "probs": dict(zip(labels, probs))}, ensure_ascii=False))
    else:
        for label, p in ranked:
            print(f"{p:7.3f}  {label}")
    return 0


def _new_or_init(args: argparse.Namespace):
    """The dual encoder a `train clip` / `train attributes` run starts from: --init or a new LiT (--arch)."""
    from vlmlab.api import dual_encoder
    from vlmlab.models import lit

    if args.init and args.arch:
        raise InputError("give --init (continue a model) or --arch (a new LiT model), not both")
    if args.init:
        return _dual_encoder(args.init)
    return dual_encoder(lit.LiTNet.new(args.arch or "scenes-clip", seed=args.seed), lit, name=args.arch)


def _train_config(args: argparse.Namespace):
    from vlmlab.train.trainer import TrainConfig

    groups = {}
    for item in args.param_lr:
        prefix, sep, value = item.rpartition("=")
        try:
            groups[prefix] = float(value)
        except ValueError:
            sep = ""
        if not sep or not prefix or groups[prefix] < 0:
            raise InputError(f"--param-lr {item!r}: expected PREFIX=LR with a learning rate >= 0 "
                             "(e.g. vision_model=0 to freeze the image tower)")
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       warmup_steps=args.warmup, weight_decay=args.weight_decay, precision=args.precision,
                       log_every=args.log_every, save_every=args.save_every, seed=args.seed, param_groups=groups)


def _train_clip(args: argparse.Namespace) -> int:
    from vlmlab.train.clip import ClipRecipe, train_clip
    from vlmlab.train.trainer import distributed_teardown

    model = _new_or_init(args)
    recipe = ClipRecipe(data=args.data, loss=args.loss, lock_image=args.lock_image, lock_text=args.lock_text,
                        scene_size=args.scene_size, multi_positive=args.multi_positive,
                        zoom=args.zoom, patch_keep=args.patch_keep, attributes=args.attributes)
    logged = train_clip(model, recipe, _train_config(args), args.out, resume=args.resume)
    distributed_teardown()
    if logged:
        print(f"step {logged[-1]['step']}: loss {logged[-1]['loss']:.4f}; model written to {Path(args.out) / 'model'}")
    return 0


def _train_attributes(args: argparse.Namespace) -> int:
    from vlmlab.train.attributes import EVAL_FILE, AttributeRecipe, train_attributes
    from vlmlab.train.trainer import distributed_teardown

    model = _new_or_init(args)
    recipe = AttributeRecipe(patches=args.patches, unmask_steps=args.unmask_steps, scene_size=args.scene_size,
                             eval_n=args.eval_n, dense_layer=args.dense)
    logged = train_attributes(model, recipe, _train_config(args), args.out, resume=args.resume)
    distributed_teardown()
    if logged:
        print(f"step {logged[-1]['step']}: loss {logged[-1]['loss']:.4f}; model written to {Path(args.out) / 'model'}")
    scores = Path(args.out) / EVAL_FILE
    if args.eval_n and scores.is_file():
        print(f"held-out accuracy: {scores.read_text().strip()}")
    return 0


def _add_train_options(p: argparse.ArgumentParser, *, lr: float, weight_decay: float) -> None:
    """Options every `vlmlab train` subcommand shares: run folder, starting model, TrainConfig."""
    p.add_argument("--out", required=True, help="run folder: checkpoint, metrics.jsonl, loss.png, model/")
    p.add_argument("--init", default=None, help="start from this dual encoder (name or HF folder)")
    p.add_argument("--arch", default=None, help="a new LiT model: ViT preset (default: scenes-clip)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64, help="global batch per optimiser step")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=weight_decay)
    p.add_argument("--param-lr", action="append", default=[], metavar="PREFIX=LR",
                   help="peak learning rate of the parameters whose names start with PREFIX (0 freezes them; "
                        "repeatable; the longest matching prefix wins)")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32",
                   help="bf16: autocast, fast only where the device multiplies bfloat16 natively (AVX-512 BF16, "
                        "AMX, recent GPUs); auto: bf16 there, fp32 elsewhere (default fp32)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.safetensors")


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    import vlmlab
    from vlmlab.data.scenes import SceneConfig
    from vlmlab.eval.harness import BASELINES, evaluate, write_report

    width, height = _parse_size(args.size)
    config = SceneConfig.preset(args.preset, width=width, height=height)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    model = BASELINES[args.model]() if args.model in BASELINES else vlmlab.load(args.model)
    err = Console(stderr=True)
    bar_ids: dict[str, int] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=err, transient=True) as progress:

        def advance(k: int, total: int) -> None:
            if "bar" not in bar_ids:
                bar_ids["bar"] = progress.add_task(f"eval {args.model} on scenes/{args.split}", total=total)
            progress.advance(bar_ids["bar"], k)

        report = evaluate(model, split=args.split, n=args.n, tasks=tasks, config=config,
                          max_new_tokens=args.max_new_tokens, name=args.model, with_chance=args.chance,
                          progress=advance)
    out = Path(args.out) if args.out else Path("vlmlab-eval") / f"{Path(args.model).name}-scenes-{args.split}"
    json_path, png_path = write_report(report, out)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
        return 0
    table = Table(title=f"{args.model} on scenes/{args.split} ({args.n} samples per task, {report.seconds:.1f} s)")
    for col in ("task", "answers", "score", *(("chance",) if report.chance else ())):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, score in report.scores.items():
        is_caption = task.startswith("caption")
        cells = [task, str(report.counts[task]), f"{score:.3f}" + (" CIDEr-D" if is_caption else "")]
        if report.chance:
            c = report.chance.get(task)
            cells.append("-" if c is None else f"{c:.3f}")
        table.add_row(*cells)
    Console().print(table)
    if report.overall is not None:
        print(f"overall (mean over non-caption tasks): {report.overall:.3f}")
    for key, value in report.extra.items():
        print(f"{key}: {value:.3f}")
    print(f"report: {json_path}" + (f", examples: {png_path}" if png_path else ""))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    import vlmlab
    from vlmlab.checkpoints.resolve import DEFAULT_DUAL
    from vlmlab.serve import ServeConfig, create_app
    from vlmlab.serve.media import MediaPolicy

    models = {}
    for spec in args.model or [DEFAULT_VLM, DEFAULT_DUAL]:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).name or spec, "", spec)
        if name in models:
            raise InputError(f"two models are named {name!r}; name one with --model NAME=PATH")
        print(f"loading {name} ({path}) ...", file=sys.stderr)
        models[name] = vlmlab.load(path, dtype=args.dtype)
    media = MediaPolicy(max_image_bytes=int(args.max_image_mb * 2**20), max_image_pixels=args.max_image_pixels,
                        allow_urls=bool(args.allow_url_host), allowed_hosts=tuple(args.allow_url_host or ()),
                        allowed_networks=tuple(args.allow_network or ()), url_timeout_s=args.url_timeout,
                        files_root=Path(args.files_root) if args.files_root else None)
    config = ServeConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * 2**20),
                         max_images=args.max_images, max_tokens=args.max_tokens, request_timeout_s=args.request_timeout,
                         media=media)
    app = create_app(models, config)
    print(f"serving {', '.join(models)} on http://{args.host}:{args.port} (web page at /, API at /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


DTYPE_HELP = ("float32 (default) matches the reference; bfloat16 is about twice as fast on CPUs with AVX-512 BF16 "
              "or AMX and far slower on CPUs without; auto: bfloat16 where native, else float32")
QUANT_HELP = ("int4: keep the language model's 4-bit GGUF weights in 4 bits (fastest decoding on CPUs with AVX-512; "
              "a GGUF file, or a parts folder such as scenes-smol whose language model is one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmlab", description="Vision-language models in pure PyTorch.")
    parser.add_argument("--version", action="version", version=f"vlmlab {__import__('vlmlab').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text with a language model")
    gen.add_argument("--model", default=DEFAULT_LM, help=f"built-in name, HF folder or .gguf file (default: {DEFAULT_LM})")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--system", default=None, help="system message (chat mode)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True, help="wrap the prompt in the chat template")
    gen.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32", help=DTYPE_HELP)
    gen.add_argument("--quantization", choices=["none", "int4"], default="none", help=QUANT_HELP)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=_generate)

    data = sub.add_parser("data", help="datasets: synthesize diagnostic scenes")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write synthetic scene samples as LLaVA JSON or image-caption pairs")
    synth.add_argument("--out", required=True, help="output folder (data.json or pairs.jsonl, plus images/)")
    synth.add_argument("--n", type=int, required=True, help="number of samples")
    synth.add_argument("--split", choices=["train", "val", "test", "compositional"], default="train")
    synth.add_argument("--seed", type=int, default=0, help="first sample index within the split (default: 0)")
    synth.add_argument("--tasks", default=None,
                       help="task mix: tasks or families with optional weights, e.g. 'vqa:3,caption,point' "
                            "(default: the standard mix)")
    synth.add_argument("--size", default="224x224", help="image size WxH (default: 224x224)")
    synth.add_argument("--preset", choices=["easy", "medium", "hard"], default="medium", help="scene difficulty")
    synth.add_argument("--format", choices=["llava", "pairs"], default="llava")
    synth.set_defaults(func=_data_synth)

    emb = sub.add_parser("embed", help="embed an image or a text with a dual encoder (CLIP, SigLIP)")
    emb.add_argument("--model", required=True, help="built-in name or HF folder")
    emb.add_argument("--image", default=None, help="image file")
    emb.add_argument("--text", default=None)
    emb.add_argument("--json", action="store_true", help='print {"embedding": [...], "dim": N}')
    emb.set_defaults(func=_embed)

    cls = sub.add_parser("classify", help="zero-shot classification of an image with a dual encoder")
    cls.add_argument("--model", required=True, help="built-in name or HF folder")
    cls.add_argument("--image", required=True, help="image file")
    cls.add_argument("--labels", required=True, help='comma-separated labels, e.g. "cat,dog,car"')
    cls.add_argument("--template", action="append", default=None,
                     help='prompt template with {} for the label (repeatable: templates are ensembled; '
                          'default "a photo of a {}.")')
    cls.add_argument("--json", action="store_true", help='print {"label": best, "probs": {label: p, ...}}')
    cls.set_defaults(func=_classify)

    def vlm_options(p: argparse.ArgumentParser, *, question: bool = True) -> None:
        p.add_argument("--model", default=DEFAULT_VLM, help=f"built-in name or LLaVA folder (default: {DEFAULT_VLM})")
        p.add_argument("--max-new-tokens", type=int, default=128)
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--top-p", type=float, default=1.0)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32", help=DTYPE_HELP)
        p.add_argument("--quantization", choices=["none", "int4"], default="none", help=QUANT_HELP)
        p.add_argument("--json", action="store_true",
                       help="print {text, token_ids, boxes, points} (boxes and points in the image's pixels)")

    ask = sub.add_parser("ask", help="ask a vision-language model about images")
    ask.add_argument("question")
    ask.add_argument("--image", action="append", default=None, help="image file (repeatable)")
    ask.add_argument("--system", default=None, help="system message")
    vlm_options(ask)
    ask.set_defaults(func=_ask)

    cap = sub.add_parser("caption", help="describe an image")
    cap.add_argument("--image", required=True, help="image file")
    cap.add_argument("--prompt", default="Describe the image.", help="the request (default: %(default)r)")
    vlm_options(cap)
    cap.set_defaults(func=_caption)

    chat = sub.add_parser("chat", help="multi-turn chat with a vision-language model on stdin ('/image PATH')")
    chat.add_argument("--system", default=None, help="system message")
    vlm_options(chat)
    chat.set_defaults(func=_chat)

    exp = sub.add_parser("explain", help="where the model looked: the answer's attention over the image, as a PNG")
    exp.add_argument("question")
    exp.add_argument("--image", required=True, help="image file")
    exp.add_argument("--out", default="explain.png", help="output PNG (default: %(default)s)")
    vlm_options(exp)
    exp.set_defaults(func=_explain)

    demo = sub.add_parser("demo", help="ask the model about a few generated scenes; draw answers, boxes and points")
    demo.add_argument("--out", default="demo.png", help="output PNG (default: %(default)s)")
    vlm_options(demo)
    demo.set_defaults(func=_demo)

    tr = sub.add_parser("train", help="train a model: `train --recipe NAME|FILE --out DIR` or `train clip ...`")
    tr.add_argument("--recipe", default=None, help="a VLM training recipe: built-in name (tiny-scenes, ...) or .toml file")
    tr.add_argument("--out", dest="recipe_out", default=None, help="run folder (stages, metrics, model/)")
    tr.add_argument("--resume", dest="resume_recipe", action="store_true", help="continue an interrupted run")
    tr.add_argument("--parallel", choices=["ddp", "fsdp"], default=None,
                    help="under torchrun: ddp (a replica per process) or fsdp (parameters, gradients and optimiser "
                         "state sharded over the processes); overrides the recipe's stages")
    tr.set_defaults(func=_train)
    tr_sub = tr.add_subparsers(dest="train_command")
    tc = tr_sub.add_parser("clip", help="contrastive training of a dual encoder (CLIP, SigLIP, LiT)")
    tc.add_argument("--data", default="scenes", help="'scenes' (generated on the fly) or an image-caption "
                                                      "JSONL file / folder (vlmlab data synth --format pairs)")
    _add_train_options(tc, lr=1e-3, weight_decay=0.1)
    tc.add_argument("--loss", choices=["infonce", "sigmoid"], default="infonce")
    tc.add_argument("--lock-image", action="store_true", help="freeze the image tower and its projection")
    tc.add_argument("--lock-text", action="store_true", help="freeze the text tower and its projection (LiT)")
    tc.add_argument("--scene-size", type=int, default=224)
    tc.add_argument("--multi-positive", action="store_true",
                    help="count pairs with identical texts as positives (class prompts repeat within a batch)")
    tc.add_argument("--zoom", type=float, default=0.0,
                    help="scenes: the fraction (0-1) of single-object pairs shown through a random crop around "
                         "the object, drawn up to 0.45 of the side (default 0)")
    tc.add_argument("--patch-keep", type=float, default=1.0,
                    help="train the image tower on this random fraction (0-1] of each image's patches, FLIP's "
                         "masking: about proportionally cheaper per image; inference sees every patch (default 1)")
    tc.add_argument("--attributes", type=float, default=0.0, metavar="WEIGHT",
                    help="scenes: add WEIGHT x the cross-entropy of shape / colour / size heads on the image "
                         "embedding of the single-object pairs, so that aligning with captions does not unlearn "
                         "what `train attributes` taught (the heads are not saved in the model; default 0)")
    tc.set_defaults(func=_train_clip)
    ta = tr_sub.add_parser("attributes", help="supervised warm start of a dual encoder's image tower: shape, "
                                              "colour and size heads on single-object scenes")
    _add_train_options(ta, lr=5e-4, weight_decay=0.05)
    ta.add_argument("--patches", type=int, default=40,
                    help="patches per image the tower trains on: every patch the object touches, then random "
                         "others (0: all; default 40 of 196)")
    ta.add_argument("--unmask-steps", type=int, default=0,
                    help="the run's last N steps see every patch (FLIP's unmasked tuning; default 0)")
    ta.add_argument("--scene-size", type=int, default=224, help="must equal the tower's image size")
    ta.add_argument("--eval-n", type=int, default=500,
                    help="held-out test scenes scored at the end, every patch in view (0: none)")
    ta.add_argument("--dense", type=int, default=None, metavar="LAYER",
                    help="per-patch heads on this layer's patch tokens (HF indexing, -1 = last) on multi-object "
                         "scenes: each patch names the shape (or background), colour and size of the object under "
                         "it; for towers a VLM reads patch by patch (--patches is then ignored)")
    ta.set_defaults(func=_train_attributes)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with a web page (chat with images, embeddings)")
    sv.add_argument("--model", action="append", default=None,
                    help="model to serve: built-in name, folder or .gguf, optionally NAME=PATH (repeatable; "
                         f"default: {DEFAULT_VLM} and scenes-clip)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                    help=DTYPE_HELP)
    sv.add_argument("--max-batch", type=int, default=8, help="requests decoded together per model (1 = no batching)")
    sv.add_argument("--max-queue", type=int, default=32, help="waiting requests before 429 (default: %(default)s)")
    sv.add_argument("--max-tokens", type=int, default=1024, help="largest max_tokens a request may ask for")
    sv.add_argument("--max-images", type=int, default=4, help="images per request")
    sv.add_argument("--max-image-mb", type=float, default=20.0, help="encoded bytes of one image, in MiB")
    sv.add_argument("--max-image-pixels", type=int, default=40_000_000, help="pixels of one image (width x height)")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="request body size, in MiB")
    sv.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may queue and generate")
    sv.add_argument("--allow-url-host", action="append", default=None,
                    help="fetch http(s) image URLs from this host (repeatable; '*.example.com', '*' = any public "
                         "host); off by default")
    sv.add_argument("--allow-network", action="append", default=None,
                    help="a private/loopback network (CIDR) that image URLs may reach (repeatable; default: none)")
    sv.add_argument("--url-timeout", type=float, default=10.0, help="seconds to fetch one image URL")
    sv.add_argument("--files-root", default=None, help="allow file:// image URLs for files under this folder")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=_serve)

    ev = sub.add_parser("eval", help="score a model on a benchmark (the synthetic scenes)")
    ev.add_argument("--model", required=True,
                    help="built-in name, folder or file; or a reference answerer: 'oracle' (answers from the "
                         "scene graph, scores 100%%) or 'majority' (each task's most frequent train answer)")
    ev.add_argument("--bench", choices=["scenes"], default="scenes")
    ev.add_argument("--split", choices=["train", "val", "test", "compositional"], default="test")
    ev.add_argument("--n", type=int, default=20, help="samples per task (default: 20)")
    ev.add_argument("--tasks", default=None, help="comma-separated tasks (default: every task)")
    ev.add_argument("--size", default="224x224", help="image size WxH (default: 224x224)")
    ev.add_argument("--preset", choices=["easy", "medium", "hard"], default="medium", help="scene difficulty")
    ev.add_argument("--max-new-tokens", type=int, default=96)
    ev.add_argument("--chance", action="store_true", help="also report each task's chance level (blind majority)")
    ev.add_argument("--out", default=None, help="report folder (default: vlmlab-eval/<model>-scenes-<split>)")
    ev.add_argument("--json", action="store_true", help="print the report as one JSON object")
    ev.set_defaults(func=_eval)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"vlmlab: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args)
    except VlmlabError as e:
        print(f"vlmlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vlmlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`vlmlab ... | head`)
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())

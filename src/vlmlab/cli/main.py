"""`vlmlab` entry point: parses arguments, dispatches to a subcommand, turns errors into messages.

Every user-caused error is a `VlmlabError`: printed as one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from vlmlab.checkpoints.resolve import DEFAULT_LM
from vlmlab.errors import VlmlabError


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
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--quantization", choices=["none", "int4"], default="none",
                     help="int4: keep a GGUF's 4-bit weights in 4 bits (fastest decoding)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.set_defaults(func=_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VlmlabError as e:
        print(f"vlmlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vlmlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

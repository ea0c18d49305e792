#!/usr/bin/env python
"""Decode benchmark: vlmlab vs transformers on SmolLM2-135M-Instruct, from the same GGUF file.

For every (implementation, dtype, batch) configuration, in a fresh subprocess:

* load the model from the GGUF file that `vlmlab.checkpoints.resolve.resolve("smollm2")` finds,
  cast to float32 or bfloat16;
* run one warm-up generation, then `--repeats` timed generations of exactly `--new-tokens` greedy
  tokens for `--batch` copies of the same chat prompt (exactly `--prompt-tokens` tokens);
* record, per generation, the host time at which each new token is available (vlmlab: each step
  `vlmlab.infer.batching.Batch` samples (each row's own token clock); transformers: each `streamer.put` from
  `model.generate`, which happens at the same point of the loop: after argmax, before the next
  forward);
* report the median time to first token (call -> first token: prefill + first sampling), the
  median decode rate per sequence ((n - 1) / (t_last - t_first)) and aggregate (batch x that), and
  the process's peak resident memory (VmHWM, i.e. including loading).

The machine's memory bandwidth is measured in its own subprocess (best read-only rate of `sum` /
fp32 mat-vec over 1 GiB; read+write rates of in-place add and copy are reported too), and with the
bytes of weights a decode step must read (all parameters once, the tied embedding / lm_head once)
it gives the bandwidth bound on batch-1 decode: read bandwidth / bytes per token.

`--rounds N` repeats the whole sweep N times and reports medians over rounds. On a shared machine
the driver waits for other processes to go quiet and re-measures disturbed configurations.

Usage (from the repository root, with the venv active):

    python benchmarks/lm_decode.py                      # everything: both impls, all dtypes (+ vlmlab int4), batch 1 and 8
    python benchmarks/lm_decode.py --rounds 3 --markdown --json /tmp/lm_decode.json   # docs/benchmarks.md
    python benchmarks/lm_decode.py --impl vlmlab --dtype bfloat16 --batch 1 --repeats 5

See benchmarks/README.md for the method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "smollm2"
IMPLS = ("vlmlab", "transformers")
DTYPES = ("float32", "bfloat16")
# vlmlab's third mode: the GGUF's 4-bit layer weights kept in 4 bits (int4 kernel, bfloat16
# activations). transformers has no such mode; its row is compared with transformers' bfloat16.
INT4 = "int4"
PEER_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", INT4: "bfloat16"}
RESULT_TAG = "@@RESULT@@ "

# The user message: the first of these whose chat-templated prompt has exactly --prompt-tokens tokens
# (SmolLM2's template adds its default system prompt, 30 tokens); for other lengths, the shortest
# word-prefix of BASE_MESSAGE that fits.
MESSAGES = ("Explain in simple words why the sky is blue during daytime.",)
BASE_MESSAGE = (
    "Explain in simple words why the sky looks blue during the day but red and orange at sunset, "
    "then give one everyday example that shows the same effect, and finally suggest a small experiment "
    "that a curious child could do at home with a glass of water, some milk and a flashlight to see "
    "the colours change, explaining what they should look for and why it happens."
)


# ---------------------------------------------------------------------------------------------
# helpers shared by the workers
# ---------------------------------------------------------------------------------------------


def proc_status_kib(field: str) -> int | None:
    """A `VmXXX:` field of /proc/self/status in KiB (Linux), else None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident set of this process in MiB: VmHWM (this exec's own high-water mark).

    Falls back to ru_maxrss, which on Linux can include the parent's RSS from before exec.
    """
    hwm = proc_status_kib("VmHWM")
    if hwm is None:
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return hwm / 1024


def rss_mib() -> float | None:
    v = proc_status_kib("VmRSS")
    return None if v is None else v / 1024


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def system_cpu_s() -> tuple[float, float] | None:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat (Linux), else None."""
    try:
        with open("/proc/stat") as fh:
            f = [int(x) for x in fh.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = f
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, steal / hz


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def summarise_runs(runs: list[dict], batch: int) -> dict:
    ttft = statistics.median(r["ttft_s"] for r in runs)
    rate = statistics.median(r["decode_tok_s"] for r in runs)
    return {
        "ttft_s": ttft,
        "decode_tok_s": rate,
        "aggregate_tok_s": rate * batch,
        "ttft_s_min": min(r["ttft_s"] for r in runs),
        "decode_tok_s_max": max(r["decode_tok_s"] for r in runs),
        "total_s": statistics.median(r["total_s"] for r in runs),
        # the most CPU other processes took (plus hypervisor steal) during any timed run, in cores
        "others_cores_max": max((r.get("others_cores", 0.0) + r.get("steal_cores", 0.0) for r in runs), default=0.0),
    }


def timing_from_stamps(t0: float, stamps: list[float], t_end: float) -> dict:
    n = len(stamps)
    return {
        "ttft_s": stamps[0] - t0,
        "decode_tok_s": (n - 1) / (stamps[-1] - stamps[0]) if n > 1 else 0.0,
        "total_s": t_end - t0,
        "new_tokens": n,
    }


# ---------------------------------------------------------------------------------------------
# workers (each runs in its own process)
# ---------------------------------------------------------------------------------------------


def worker_bandwidth(spec: dict) -> dict:
    """Memory bandwidth with all torch threads: best of `passes` x `trials` over a `gib` GiB float32 tensor.

    Read-only kernels (bytes = tensor size): `a.sum()` and an fp32 matrix-vector product over `a`
    viewed as a (16384, n/16384) matrix (what a batch-1 decode step does with its weights).
    Read+write kernels (bytes = 2 x size): in-place `b.add_(1)` and `b.copy_(a)` (the write-allocate
    read of b that copy may cause is not counted, as in STREAM, so copy reads low).
    `read_GBps`, used for the decode bound, is the best read-only figure.
    """
    import torch

    n = int(spec.get("gib", 1.0) * (1 << 30)) // 4
    n -= n % 16384
    trials = int(spec.get("trials", 10))
    passes = int(spec.get("passes", 5))

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(trials):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    sys0, own0, w0 = system_cpu_s(), cpu_seconds(), time.perf_counter()
    kernels: dict[str, float] = {}
    per_pass = []
    for i in range(passes):  # fresh tensors each pass, spread over time: on a shared VM the figure moves
        if i:
            time.sleep(0.5)
        a = torch.ones(n, dtype=torch.float32)
        b = torch.empty_like(a)
        b.fill_(0.0)  # touch the pages before timing
        mat, vec = a.view(16384, -1), torch.ones(n // 16384)
        size = a.numel() * a.element_size()
        this = {
            "read_sum": size / best(lambda: a.sum()),
            "read_mv": size / best(lambda: torch.mv(mat, vec)),
            "rw_add_inplace": 2 * size / best(lambda: b.add_(1.0)),
            "rw_copy": 2 * size / best(lambda: b.copy_(a)),
        }
        per_pass.append({k: v / 1e9 for k, v in this.items()})
        kernels = {k: max(v, kernels.get(k, 0.0)) for k, v in this.items()}
        del a, b, mat
    sys1, own1, w1 = system_cpu_s(), cpu_seconds(), time.perf_counter()
    others = None
    if sys0 is not None and sys1 is not None:
        others = (max(0.0, (sys1[0] - sys0[0]) - (own1 - own0)) + (sys1[1] - sys0[1])) / (w1 - w0)
    return {
        "threads": torch.get_num_threads(),
        "tensor_bytes": size,
        "trials": trials,
        "passes": passes,
        "kernels_GBps": {k: v / 1e9 for k, v in kernels.items()},
        "per_pass_GBps": per_pass,
        "read_GBps": max(kernels["read_sum"], kernels["read_mv"]) / 1e9,
        "rw_GBps": max(kernels["rw_add_inplace"], kernels["rw_copy"]) / 1e9,
        "others_cores": others,
    }


def logical_param_count(net) -> int:
    """Parameters of the network as built, every distinct tensor once (the tied embedding / lm_head once).

    Counted on a weightless (meta-device) copy of the architecture when the class offers one
    (`without_weights`), because a loaded vlmlab network may hold its linears in oneDNN's packed
    layout (not parameters; the tied lm_head then being a packed copy of the embedding).
    """
    ref = net
    if hasattr(type(net), "without_weights") and hasattr(net, "cfg"):
        ref = type(net).without_weights(net.cfg)
    seen, count = set(), 0
    for p in ref.parameters():  # parameters() already yields a tied tensor once
        if id(p) not in seen:
            seen.add(id(p))
            count += p.numel()
    return count


def weight_bytes_per_token(net, n_params: int, dtype) -> int:
    """Bytes of weights a batch-1 decode step reads: every parameter once in `dtype`, except that
    4-bit layers read half a byte per weight plus their bfloat16 scale and zero per group."""
    try:
        from vlmlab.nn.quant import Int4Linear
    except ImportError:  # an older vlmlab (--vlmlab-src)
        return n_params * dtype.itemsize
    total, int4_params = 0, 0
    for m in net.modules():
        if isinstance(m, Int4Linear):
            out, inp = m.weight_int4.shape
            int4_params += out * inp
            total += out * inp // 2 + 2 * 2 * out * inp // m.weight_int4.group_size
    return total + (n_params - int4_params) * dtype.itemsize


def gguf_param_count(path) -> int | None:
    """Elements of all tensors in the GGUF file (a tied lm_head is not stored separately)."""
    try:
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(path).tensors)
    except Exception:  # noqa: BLE001 - only a cross-check
        return None


def worker_vlmlab(spec: dict) -> dict:
    import torch

    import vlmlab
    from vlmlab.infer.batching import Batch, Row
    from vlmlab.infer.generate import GenerationConfig

    batch, new_tokens, repeats = spec["batch"], spec["new_tokens"], spec["repeats"]
    rss0 = rss_mib()
    t = time.perf_counter()
    if spec["dtype"] == INT4:
        lm = vlmlab.load(MODEL, dtype="bfloat16", quantization="int4")
    else:
        lm = vlmlab.load(MODEL, dtype=spec["dtype"])
    getattr(lm, "pack", lambda: None)()  # vlmlab packs at the first generation (older: on load); timed as loading
    load_s = time.perf_counter() - t
    ids = lm.prompt_ids(spec["message"])
    if ids != spec["prompt_ids"]:
        raise SystemExit(f"vlmlab prompt ids differ from the expected ones:\n{ids}\n{spec['prompt_ids']}")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    prompts = [ids] * batch

    def run_once() -> tuple[dict, list[int]]:
        cfg = GenerationConfig(max_new_tokens=new_tokens, stop_token_ids=())
        rows = [Row(p, cfg) for p in prompts]
        t0 = time.perf_counter()
        for _ in Batch(lm).run(rows):
            pass
        t_end, first = time.perf_counter(), rows[0]
        n = len(first.tokens)  # the rows' own clocks: when each token was sampled, before the next forward
        span = first.last_token_at - first.first_token_at
        return {"ttft_s": first.first_token_at - t0, "decode_tok_s": (n - 1) / span if n > 1 else 0.0,
                "total_s": t_end - t0, "new_tokens": n}, first.tokens

    n_params = logical_param_count(lm.net)
    wb = {"params": n_params, "bytes": weight_bytes_per_token(lm.net, n_params, lm.dtype), "dtype": spec["dtype"]}
    try:  # newer vlmlab keeps a float32 KV cache for half-precision models on CPU
        from vlmlab.infer.generate import cache_dtype

        kv_dtype = cache_dtype(lm.net)
    except ImportError:
        kv_dtype = lm.dtype
    cfg = lm.net.cfg
    kv_bytes_per_pos = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * kv_dtype.itemsize
    return measure(
        run_once,
        repeats,
        batch,
        new_tokens,
        extra={
            "load_s": load_s,
            "rss_before_load_mib": rss0,
            "rss_after_load_mib": None,  # filled by measure
            "weights": wb,
            "kv_bytes_per_position": kv_bytes_per_pos,
            "kv_dtype": str(kv_dtype),
            "onednn_packed": getattr(lm, "packed", None),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "vlmlab": vlmlab.__version__,
            "vlmlab_file": vlmlab.__file__,
        },
    )


def worker_transformers(spec: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from vlmlab.checkpoints.resolve import resolve

    transformers.logging.set_verbosity_error()
    batch, new_tokens, repeats = spec["batch"], spec["new_tokens"], spec["repeats"]
    path = resolve(MODEL)
    dtype = getattr(torch, spec["dtype"])
    rss0 = rss_mib()
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    load_s = time.perf_counter() - t
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    text = tok.apply_chat_template(
        [{"role": "user", "content": spec["message"]}], tokenize=False, add_generation_prompt=True
    )
    enc = tok([text] * batch, return_tensors="pt", padding=True, add_special_tokens=False)
    if enc["input_ids"][0].tolist() != spec["prompt_ids"]:
        raise SystemExit(
            f"transformers prompt ids differ from the expected ones:\n{enc['input_ids'][0].tolist()}\n"
            f"{spec['prompt_ids']}"
        )

    class StampStreamer(BaseStreamer):
        """Records the host time of every new token; generate's first put() is the prompt."""

        def __init__(self):
            self.stamps: list[float] = []
            self.first_row: list[int] = []
            self.got_prompt = False

        def put(self, value):
            if not self.got_prompt:
                self.got_prompt = True
                return
            self.stamps.append(time.perf_counter())
            self.first_row.append(int(value.reshape(-1)[0]))

        def end(self):
            pass

    def run_once() -> tuple[dict, list[int]]:
        streamer = StampStreamer()
        t0 = time.perf_counter()
        model.generate(
            **enc,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
            streamer=streamer,
        )
        return timing_from_stamps(t0, streamer.stamps, time.perf_counter()), streamer.first_row

    return measure(
        run_once,
        repeats,
        batch,
        new_tokens,
        extra={
            "load_s": load_s,
            "rss_before_load_mib": rss0,
            "rss_after_load_mib": None,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    )


def measure(run_once, repeats: int, batch: int, new_tokens: int, extra: dict) -> dict:
    extra["rss_after_load_mib"] = rss_mib()
    load_before = loadavg()
    _, tokens = run_once()  # warm-up
    if len(tokens) != new_tokens:
        raise SystemExit(f"expected {new_tokens} new tokens, got {len(tokens)}")
    runs = []
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        own0, sys0, w0 = cpu_seconds(), system_cpu_s(), time.perf_counter()
        timing, _ = run_once()
        own1, sys1, w1 = cpu_seconds(), system_cpu_s(), time.perf_counter()
        if timing["new_tokens"] != new_tokens:
            raise SystemExit(f"expected {new_tokens} new tokens, got {timing['new_tokens']}")
        if sys0 is not None and sys1 is not None:
            # CPU used by other processes (and stolen by the hypervisor) while this run was timed
            timing["others_cores"] = max(0.0, (sys1[0] - sys0[0]) - (own1 - own0)) / (w1 - w0)
            timing["steal_cores"] = (sys1[1] - sys0[1]) / (w1 - w0)
        runs.append(timing)
    cpu_util = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0)
    return {
        **summarise_runs(runs, batch),
        "runs": runs,
        "peak_rss_mib": peak_rss_mib(),
        "cpu_cores_busy": cpu_util,  # this process's CPU time / wall time while timing
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "first_row_tokens": tokens,
        **extra,
    }


WORKERS = {"bandwidth": worker_bandwidth, "vlmlab": worker_vlmlab, "transformers": worker_transformers}


def worker_main(spec_json: str, workers: dict | None = None) -> None:
    """Run one measurement in this (fresh) process and print its result for the driver."""
    spec = json.loads(spec_json)
    if spec.get("vlmlab_src"):
        sys.path.insert(0, spec["vlmlab_src"])  # ahead of the installed (editable) vlmlab
    result = (workers or WORKERS)[spec["worker"]](spec)
    print(RESULT_TAG + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores over 2 s; return the last reading.

    The driver itself is idle, so the machine's busy CPU time is other processes' (plus steal).
    """
    deadline = time.monotonic() + max_wait
    while True:
        a, t = system_cpu_s(), time.monotonic()
        time.sleep(2.0)
        b, u = system_cpu_s(), time.monotonic()
        if a is None or b is None:
            return 0.0
        busy = ((b[0] - a[0]) + (b[1] - a[1])) / (u - t)
        if busy < threshold or u >= deadline:
            return busy
        time.sleep(3.0)


def combine_rounds(per_round: list[dict]) -> list[dict]:
    """One result per configuration from several rounds: medians of the per-round medians."""
    out = []
    keys = list(dict.fromkeys((r["impl"], r["dtype"], r["batch"]) for r in per_round))
    for key in keys:
        rs = [r for r in per_round if (r["impl"], r["dtype"], r["batch"]) == key]
        c = dict(rs[0])
        c["ttft_s"] = statistics.median(r["ttft_s"] for r in rs)
        c["decode_tok_s"] = statistics.median(r["decode_tok_s"] for r in rs)
        c["aggregate_tok_s"] = c["decode_tok_s"] * c["batch"]
        c["peak_rss_mib"] = max(r["peak_rss_mib"] for r in rs)
        c["others_cores_max"] = max(r["others_cores_max"] for r in rs)
        c["runs"] = [run for r in rs for run in r["runs"]]
        c["ttft_s_min"] = min(run["ttft_s"] for run in c["runs"])
        c["decode_tok_s_max"] = max(run["decode_tok_s"] for run in c["runs"])
        c["total_s"] = statistics.median(run["total_s"] for run in c["runs"])
        c["attempts"] = sum(r["attempts"] for r in rs)
        c["per_round"] = [
            {k: r[k] for k in ("round", "ttft_s", "decode_tok_s", "peak_rss_mib", "others_cores_max", "load_s")}
            for r in rs
        ]
        c.pop("round", None)
        out.append(c)
    return out


def run_worker(spec: dict, script: str = __file__) -> dict:
    """Run one worker of `script` in a fresh interpreter; return its result dict."""
    cmd = [sys.executable, os.path.abspath(script), "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
    raise SystemExit(f"worker {spec['worker']} failed (exit code {proc.returncode})")


def build_prompt(target: int) -> tuple[str, list[int]]:
    """The shortest prefix of BASE_MESSAGE whose chat-templated prompt has exactly `target` tokens."""
    from vlmlab.checkpoints.gguf import read_gguf
    from vlmlab.checkpoints.resolve import resolve
    from vlmlab.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(read_gguf(resolve(MODEL)))

    def ids_of(message: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    for message in MESSAGES:
        ids = ids_of(message)
        if len(ids) == target:
            return message, ids
    words = BASE_MESSAGE.split()
    for k in range(1, len(words) + 1):
        base = " ".join(words[:k]).rstrip(",.")
        for message in (base, base + ".", base + "?"):
            ids = ids_of(message)
            if len(ids) == target:
                return message, ids
            if len(ids) > target + 1:
                break
    raise SystemExit(f"could not build a chat prompt of exactly {target} tokens")


def vlmlab_provenance(src: str | None) -> dict:
    """Which vlmlab code is benchmarked: the --vlmlab-src folder, or the repository's commit (+ dirty flag)."""
    root = Path(src).resolve() if src else Path(__file__).resolve().parents[1]
    info: dict = {"src": str(root if src else root / "src")}
    try:  # read-only git queries
        git = ["git", "-C", str(root)]
        info["commit"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        if not src:
            status = subprocess.run([*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True,
                                    check=True).stdout
            info["uncommitted_changes_in_src"] = bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    cpu = cpu_model()
    import torch

    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        with open("/proc/meminfo") as fh:
            info["mem_total_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    return info


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def make_rows(results: list[dict]) -> list[dict]:
    """Flat table rows, with vlmlab/transformers ratios for each (dtype, batch)."""
    by_key = {(r["impl"], r["dtype"], r["batch"]): r for r in results}
    rows = []
    for r in results:
        other = by_key.get(("transformers", PEER_DTYPE[r["dtype"]], r["batch"]))
        ratio = None
        if r["impl"] == "vlmlab" and other is not None:
            vt, tt = r["first_row_tokens"], other["first_row_tokens"]
            same = next((i for i, (a, b) in enumerate(zip(vt, tt)) if a != b), min(len(vt), len(tt)))
            ratio = {
                "decode": r["decode_tok_s"] / other["decode_tok_s"],
                "ttft": r["ttft_s"] / other["ttft_s"],
                "rss": r["peak_rss_mib"] / other["peak_rss_mib"],
                "same_tokens": f"{same}/{len(vt)}",
            }
        rows.append({**r, "ratio": ratio})
    return rows


HEADERS = [
    "impl", "dtype", "batch", "TTFT s", "decode tok/s/seq", "(min–max)", "aggregate tok/s", "peak RSS MiB",
    "decode vl/hf", "TTFT vl/hf", "RSS vl/hf", "same tokens",
]


def row_cells(r: dict) -> list[str]:
    q = r["ratio"] or {}
    return [
        r["impl"],
        r["dtype"],
        str(r["batch"]),
        fmt(r["ttft_s"], ".3f"),
        fmt(r["decode_tok_s"], ".1f"),
        "{:.1f}–{:.1f}".format(min(x["decode_tok_s"] for x in r["runs"]), max(x["decode_tok_s"] for x in r["runs"])),
        fmt(r["aggregate_tok_s"], ".1f"),
        fmt(r["peak_rss_mib"], ".0f"),
        fmt(q.get("decode"), ".2f"),
        fmt(q.get("ttft"), ".2f"),
        fmt(q.get("rss"), ".2f"),
        q.get("same_tokens", "-"),
    ]


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(out)


def bound_rows(report: dict) -> list[list[str]]:
    rows = []
    for b in report["bounds"]:
        rows.append([
            b["dtype"],
            f"{b['weight_bytes'] / 1e6:.1f}",
            f"{b['kv_bytes_at_end'] / 1e6:.2f}",
            f"{b['bound_tok_s']:.1f}",
            fmt(b.get("vlmlab_tok_s"), ".1f"),
            fmt(b.get("vlmlab_pct_of_bound"), ".0f") + ("%" if b.get("vlmlab_pct_of_bound") is not None else ""),
            fmt(b.get("transformers_tok_s"), ".1f"),
            fmt(b.get("transformers_pct_of_bound"), ".0f") + ("%" if b.get("transformers_pct_of_bound") is not None else ""),
        ])
    return rows


BOUND_HEADERS = [
    "dtype", "weights MB/token", "KV MB/token (last step)", "bound tok/s (batch 1)",
    "vlmlab tok/s", "vlmlab % of bound", "transformers tok/s", "transformers % of bound",
]


def print_report(report: dict, markdown: bool) -> None:
    rows = make_rows(report["results"])
    bw = report["bandwidth"]
    k = bw["kernels_GBps"]
    bw_line = (
        f"memory bandwidth ({bw['threads']} threads, best of {bw.get('passes', 1)} x {bw['trials']} runs per kernel"
        + (f" in each of {report['rounds']} rounds" if report.get("rounds", 1) > 1 else "")
        + f", over {bw['tensor_bytes'] / 2**30:.0f} GiB, "
        f"GB = 1e9 B): read {bw['read_GBps']:.1f} GB/s (sum {k['read_sum']:.1f}, fp32 mat-vec {k['read_mv']:.1f}); "
        f"read+write {bw['rw_GBps']:.1f} GB/s (in-place add {k['rw_add_inplace']:.1f}, copy {k['rw_copy']:.1f}); "
        f"the bound uses the read figure"
    )
    busy = [r for r in report["results"] if r.get("others_cores_max", 0) > report.get("busy_threshold", 1e9)]
    if busy:
        bw_line += (
            "\nWARNING: other processes used CPU during " + ", ".join(f"{r['impl']}/{r['dtype']}/b{r['batch']}" for r in busy)
            + " (see others_cores_max in --json); re-run those on a quiet machine"
        )
    code = report.get("vlmlab_code", {})
    prompt_line = (
        f"prompt: {report['prompt_tokens']} tokens (chat template), user message: {report['message']!r}\n"
        f"vlmlab code: {code.get('src')}"
        + (f" (commit {code['commit']}" if code.get("commit") else "")
        + (", with uncommitted changes in src/" if code.get("uncommitted_changes_in_src") else "")
        + (")" if code.get("commit") else "")
    )
    if markdown:
        print(prompt_line + "\n")
        print(markdown_table(HEADERS, [row_cells(r) for r in rows]))
        print()
        print(bw_line + "\n")
        if report["bounds"]:
            print(markdown_table(BOUND_HEADERS, bound_rows(report)))
        return
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print_report(report, markdown=True)
        return
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(prompt_line)
    title = f"decode: {report['new_tokens']} new tokens, median of {report['repeats']} runs"
    if report.get("rounds", 1) > 1:
        title += f", median over {report['rounds']} rounds"
    table = Table(title=title)
    for i, h in enumerate(HEADERS):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*row_cells(r))
    console.print(table)
    console.print(bw_line)
    if report["bounds"]:
        bt = Table(title="bandwidth bound on batch-1 decode (bytes read per token = all weights once)")
        for i, h in enumerate(BOUND_HEADERS):
            bt.add_column(h, justify="left" if i == 0 else "right")
        for cells in bound_rows(report):
            bt.add_row(*cells)
        console.print(bt)


def compute_bounds(results: list[dict], bandwidth: dict, prompt_tokens: int, new_tokens: int) -> list[dict]:
    bounds = []
    for dtype in (*DTYPES, INT4):
        vl = [r for r in results if r["impl"] == "vlmlab" and r["dtype"] == dtype]
        if not vl:
            continue
        weights = vl[0]["weights"]["bytes"]
        bound = bandwidth["read_GBps"] * 1e9 / weights
        b = {
            "dtype": dtype,
            "params": vl[0]["weights"]["params"],
            "weight_bytes": weights,
            "kv_bytes_at_end": vl[0]["kv_bytes_per_position"] * (prompt_tokens + new_tokens - 1),
            "bound_tok_s": bound,
        }
        for impl in IMPLS:
            one = [r for r in results if r["impl"] == impl and r["dtype"] == dtype and r["batch"] == 1]
            if one:
                b[f"{impl}_tok_s"] = one[0]["decode_tok_s"]
                b[f"{impl}_pct_of_bound"] = 100 * one[0]["decode_tok_s"] / bound
        bounds.append(b)
    return bounds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=[*IMPLS, "both"], default="both")
    ap.add_argument(
        "--dtype", choices=[*DTYPES, INT4, "all"], default="all",
        help="int4: vlmlab with the GGUF's 4-bit weights kept 4-bit (transformers runs bfloat16 as its peer)",
    )
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=42)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    ap.add_argument(
        "--rounds", type=int, default=1,
        help="run the whole sweep this many times (fresh processes each time) and report, per "
        "configuration, the median over rounds of each round's median",
    )
    ap.add_argument("--bandwidth-gib", type=float, default=1.0, help="tensor size for the bandwidth test")
    ap.add_argument(
        "--busy-retries", type=int, default=2,
        help="measure a configuration again (keeping the quietest) when other processes used more than "
        "--busy-threshold cores during its timed runs",
    )
    ap.add_argument("--busy-threshold", type=float, default=0.25, help="cores (default 0.25)")
    ap.add_argument(
        "--wait-quiet", type=float, default=60, metavar="S",
        help="before each measurement, wait up to S seconds for other processes to use less than "
        "--busy-threshold cores (0: don't wait)",
    )
    ap.add_argument(
        "--vlmlab-src", metavar="DIR",
        help="benchmark the vlmlab package in DIR (put first on sys.path, e.g. a `git archive` export "
        "of another commit's src/) instead of the installed one",
    )
    ap.add_argument("--markdown", action="store_true", help="print markdown tables instead of rich ones")
    ap.add_argument("--json", metavar="OUT", help="write all results (every run) to this JSON file")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        worker_main(args._worker)
        return
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the decode rate needs two tokens)")

    started = time.perf_counter()
    impls = IMPLS if args.impl == "both" else (args.impl,)
    dtypes = (*DTYPES, INT4) if args.dtype == "all" else (args.dtype,)
    if args.vlmlab_src:
        sys.path.insert(0, os.path.abspath(args.vlmlab_src))
    message, prompt_ids = build_prompt(args.prompt_tokens)
    print(f"prompt ({len(prompt_ids)} tokens with the chat template): {message!r}", file=sys.stderr)

    def quiet_enough(r: dict, key: str) -> bool:
        return (r.get(key) or 0.0) <= args.busy_threshold

    def settle() -> None:
        if args.wait_quiet > 0:
            busy = wait_for_quiet(args.busy_threshold, args.wait_quiet)
            if busy >= args.busy_threshold:
                print(f"  (still {busy:.2f} cores busy after waiting {args.wait_quiet:.0f} s)", file=sys.stderr)

    def measure_bandwidth() -> dict:
        print("measuring memory bandwidth ...", end=" ", file=sys.stderr, flush=True)
        settle()
        bw_spec = {"worker": "bandwidth", "gib": args.bandwidth_gib, "trials": 10}
        bw = run_worker(bw_spec)
        for _ in range(args.busy_retries):
            if quiet_enough(bw, "others_cores"):
                break
            settle()
            again = run_worker(bw_spec)
            if again["read_GBps"] > bw["read_GBps"]:
                bw = again
        print(
            f"read {bw['read_GBps']:.1f} GB/s, read+write {bw['rw_GBps']:.1f} GB/s "
            f"(others used {bw['others_cores'] or 0:.2f} cores)",
            file=sys.stderr,
        )
        return bw

    def measure_config(impl: str, dtype: str, batch: int) -> dict:
        spec = {
            "worker": impl, "dtype": dtype, "batch": batch, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "message": message, "prompt_ids": prompt_ids,
            "vlmlab_src": os.path.abspath(args.vlmlab_src) if args.vlmlab_src else None,
        }
        best = None
        for attempt in range(1 + args.busy_retries):
            settle()
            print(f"{impl:12s} {dtype:8s} batch {batch} ...", end=" ", file=sys.stderr, flush=True)
            r = run_worker(spec)
            r.update(impl=impl, dtype=dtype, batch=batch)
            print(
                f"TTFT {r['ttft_s']:.3f}s  decode {r['decode_tok_s']:.1f} tok/s/seq  "
                f"peak RSS {r['peak_rss_mib']:.0f} MiB  (load {r['load_s']:.1f}s, "
                f"others used up to {r['others_cores_max']:.2f} cores)",
                file=sys.stderr,
            )
            if best is None or r["others_cores_max"] < best["others_cores_max"]:
                best = r
            if quiet_enough(r, "others_cores_max"):
                break
            if attempt < args.busy_retries:
                print("  machine busy, measuring again", file=sys.stderr)
        best["attempts"] = attempt + 1
        return best

    bandwidths, per_round = [], []
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"--- round {rnd + 1} of {args.rounds}", file=sys.stderr)
        bandwidths.append(measure_bandwidth())
        for dtype in dtypes:
            for batch in args.batch:
                for impl in impls:  # the two impls back to back, so they see similar machine load
                    if impl == "transformers" and dtype == INT4:
                        continue  # its peer row is transformers' bfloat16
                    per_round.append({**measure_config(impl, dtype, batch), "round": rnd + 1})
    bandwidth = max(bandwidths, key=lambda b: b["read_GBps"])  # best of the rounds
    from vlmlab.checkpoints.resolve import resolve

    gguf_params = gguf_param_count(resolve(MODEL))
    for r in per_round:
        if r["impl"] == "vlmlab" and gguf_params and r["weights"]["params"] != gguf_params:
            print(
                f"WARNING: vlmlab counts {r['weights']['params']} parameters, the GGUF file holds {gguf_params}",
                file=sys.stderr,
            )
    results = combine_rounds(per_round) if args.rounds > 1 else per_round

    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python benchmarks/lm_decode.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "vlmlab_code": vlmlab_provenance(args.vlmlab_src),
        "model": MODEL,
        "message": message,
        "prompt_ids": prompt_ids,
        "prompt_tokens": len(prompt_ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "busy_threshold": args.busy_threshold,
        "bandwidth": bandwidth,
        "bandwidth_rounds": bandwidths,
        "gguf_params": gguf_params,
        "results": results,
        "bounds": compute_bounds(results, bandwidth, len(prompt_ids), args.new_tokens),
        "wall_s": time.perf_counter() - started,
    }
    print_report(report, args.markdown)
    print(f"\nfull run took {report['wall_s']:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""One trainer for every stage: contrastive pre-training, projector alignment, instruction tuning.

What trains, and how fast, is configuration: `param_groups` maps parameter-name prefixes to
learning rates, and a rate of 0 freezes (the parameter is not given to the optimiser and gets
no gradient). The model-specific part is a `step_fn(model, batch) -> (loss, metrics)`; the data
is a deterministic function of the position in the run, `data(step, micro, rank, world, size)`,
which is what makes resuming exact: after a restart the run continues with the very batches,
optimiser state and learning rate it would have had.

Features: AdamW with warmup + cosine decay, bfloat16 autocast, gradient accumulation, gradient
clipping, a rich progress bar (loss, samples/s, ETA), `metrics.jsonl`, `loss.png`, an atomic
single-file checkpoint (`checkpoint.safetensors`: trainable weights, optimiser state, and the
run state as metadata; no pickles), and, under `torchrun` (gloo on CPU, nccl on GPU), each rank
taking its own slice of every global batch: DDP (every rank holds the whole model) or FSDP
(`parallel = "fsdp"`: parameters, gradients and optimiser state sharded over the ranks, each
transformer block gathered only while it runs; see `Trainer`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from vlmlab.checkpoints.hf import atomic_write
from vlmlab.errors import CheckpointError, ConfigError
from vlmlab.hardware import fast_bfloat16, warn_if_slow_bfloat16
from vlmlab.nn.packed import PackedLinear

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"


@dataclass
class TrainConfig:
    steps: int = 1000  # optimiser steps
    batch_size: int = 64  # samples per optimiser step, over all processes and micro-steps
    grad_accum: int = 1  # micro-steps per optimiser step
    lr: float = 1e-3  # peak learning rate of groups that do not set their own
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 (autocast) | auto (bf16 where the device multiplies it natively)
    log_every: int = 10
    save_every: int = 100
    seed: int = 0
    param_groups: dict[str, float] = field(default_factory=dict)  # name prefix -> lr (0 = frozen)
    parallel: str = "ddp"  # with several processes: ddp (replicas) | fsdp (sharded)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"training option '{name}' must be a positive integer, got {value!r}")
        if self.precision not in ("fp32", "bf16", "auto"):
            raise ConfigError(f"precision {self.precision!r}: expected 'fp32', 'bf16' or 'auto'")
        if self.parallel not in ("ddp", "fsdp"):
            raise ConfigError(f"parallel {self.parallel!r}: expected 'ddp' or 'fsdp'")
        if self.lr <= 0 or self.warmup_steps < 0:
            raise ConfigError("lr must be positive and warmup_steps non-negative")
        self.betas = tuple(self.betas)

    def lr_at(self, step: int, peak: float) -> float:
        """Linear warmup over `warmup_steps`, then cosine decay to peak * min_lr_ratio."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return peak * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---- distributed ------------------------------------------------------------------------------


def distributed_setup() -> tuple[int, int]:
    """(rank, world size); joins the process group when launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed_barrier() -> None:
    """Wait for every process of the group (nothing to wait for in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def distributed_teardown() -> None:
    """Leave the process group together (a barrier, then destroy): a rank that exits with the group
    still alive can abort in gloo's thread teardown ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ---- the trainer ------------------------------------------------------------------------------

StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
DataFn = Callable[[int, int, int, int, int], Any]  # (step, micro, rank, world, size) -> batch


class Trainer:
    def __init__(self, model: nn.Module, step_fn: StepFn, data: DataFn, cfg: TrainConfig, out: str | Path, *,
                 after_step: Callable[[nn.Module], None] | None = None, samples_per_batch: str = "samples",
                 find_unused_parameters: bool = False):
        """find_unused_parameters: some trainable parameters get no gradient in a step (a vision
        tower's pooling head under a VLM that reads hidden states); DDP must not wait for them.

        With FSDP the trainer shards a copy of `model`: every block of its layer stacks (each
        `nn.ModuleList` entry) is one unit, gathered for its forward and backward and sharded
        again after; the rest is the root unit. `model` itself is kept as it is and receives
        the trained weights at each checkpoint and at the end, so callers (saving, merging LoRA)
        see an ordinary module. `step_fn` and `after_step` get the sharded copy."""
        self.step_fn, self.data, self.cfg = step_fn, data, cfg
        device = next(model.parameters()).device.type
        if cfg.precision == "auto":  # resolved here, where the device is known (the checkpoint records the choice)
            cfg.precision = "bf16" if fast_bfloat16(device) else "fp32"
        if cfg.precision == "bf16":
            warn_if_slow_bfloat16("bf16", device, what="training (precision bf16)")
        self.out = Path(out)
        self.after_step = after_step
        self.rank, self.world = distributed_setup()
        micro = cfg.batch_size // (self.world * cfg.grad_accum)
        if micro * self.world * cfg.grad_accum != cfg.batch_size:
            raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by processes ({self.world}) x "
                              f"grad_accum ({cfg.grad_accum})")
        self.micro_batch = micro
        self.unit = samples_per_batch
        packed = next((n for n, m in model.named_modules() if isinstance(m, PackedLinear)), None)
        if packed is not None:
            raise ConfigError(f"{packed}: this network's linears are packed for inference (it has generated); "
                              "train it inside `with model.unpacked() as net:`")
        self.plain = model  # the caller's module
        self.fsdp = self.world > 1 and cfg.parallel == "fsdp"
        self.model = _fully_shard(model) if self.fsdp else model
        self.named = self._trainable()
        if not self.named:
            raise ConfigError("nothing to train: every parameter is frozen (learning rate 0)")
        # One optimiser group per (learning rate, weight decay): few groups keep AdamW's fused
        # multi-tensor update fast. Matrices decay; biases, norms and scalars do not.
        by_key: dict[tuple[float, float], dict] = {}
        for n, (p, lr) in self.named.items():
            wd = cfg.weight_decay if p.dim() >= 2 else 0.0
            group = by_key.setdefault((lr, wd), {"params": [], "names": [], "lr": lr, "peak_lr": lr, "weight_decay": wd})
            group["params"].append(p)
            group["names"].append(n)
        self.optimizer = torch.optim.AdamW(list(by_key.values()), betas=cfg.betas, eps=cfg.eps)
        self.step = 0
        self.ddp = None
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)

    def _trainable(self) -> dict[str, tuple[nn.Parameter, float]]:
        """name -> (parameter, peak lr); the longest matching prefix in param_groups wins."""
        out = {}
        for name, p in self.model.named_parameters():
            matches = [k for k in self.cfg.param_groups if name == k or name.startswith(k.rstrip(".") + ".") or k == ""]
            lr = self.cfg.param_groups[max(matches, key=len)] if matches else self.cfg.lr
            p.requires_grad_(lr > 0)
            if lr > 0:
                out[name] = (p, lr)
        return out

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- checkpoints ----

    def save_checkpoint(self) -> None:
        """Trainable weights + AdamW moments in one safetensors file, written atomically, with
        the run state in its metadata; only rank 0 writes (under FSDP every rank first helps to
        gather the full tensors, which also go into the caller's module)."""
        from safetensors.torch import save

        tensors: dict[str, torch.Tensor] = {}
        steps = {}
        for name, p in self._params():
            tensors[f"model/{name}"] = _full(p.detach()).contiguous()
            st = self.optimizer.state.get(p, {})
            if st:
                tensors[f"adam/{name}/exp_avg"] = _full(st["exp_avg"]).contiguous()
                tensors[f"adam/{name}/exp_avg_sq"] = _full(st["exp_avg_sq"]).contiguous()
                steps[name] = float(st["step"])
        if self.fsdp:
            self._write_back({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
        if not self.is_main:
            return
        meta = {"step": str(self.step), "adam_steps": json.dumps(steps),
                "config": json.dumps(asdict(self.cfg)), "world": str(self.world)}
        atomic_write(self.out / CHECKPOINT, save(tensors, metadata=meta))

    def load_checkpoint(self) -> None:
        """Resume from `out/checkpoint.safetensors` (same trainable parameters and shapes)."""
        from safetensors import safe_open

        path = self.out / CHECKPOINT
        if not path.is_file():
            raise CheckpointError(f"{path}: no checkpoint to resume from")
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from None
        try:
            step, adam_steps = int(meta["step"]), json.loads(meta["adam_steps"])
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"{path}: checkpoint metadata is incomplete ({e})") from None
        names = {k.split("/", 1)[1] for k in tensors if k.startswith("model/")}
        if names != set(self.named):
            missing, extra = set(self.named) - names, names - set(self.named)
            raise CheckpointError(f"{path}: the checkpoint trains different parameters "
                                  f"(missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})")
        with torch.no_grad():
            for name, p in self._params():
                saved = tensors[f"model/{name}"]
                if saved.shape != p.shape:
                    raise CheckpointError(f"{path}: '{name}' has shape {tuple(saved.shape)}, expected {tuple(p.shape)}")
                p.copy_(_like(saved, p))
                if name in adam_steps:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(adam_steps[name]),
                        "exp_avg": _like(tensors[f"adam/{name}/exp_avg"], p),
                        "exp_avg_sq": _like(tensors[f"adam/{name}/exp_avg_sq"], p),
                    }
        if self.fsdp:
            self._write_back({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
        self.step = step
        self._truncate_metrics(step)

    def _write_back(self, full: dict[str, torch.Tensor]) -> None:
        """Copy trained weights (full tensors, by name) into the caller's module."""
        params = dict(self.plain.named_parameters())
        with torch.no_grad():
            for name, value in full.items():
                params[name].copy_(value)

    def _params(self):
        """(name, parameter) of everything the optimiser updates."""
        for group in self.optimizer.param_groups:
            yield from zip(group["names"], group["params"])

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines written after the checkpoint (they will be written again)."""
        path = self.out / METRICS
        if not self.is_main or not path.is_file():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write(path, "".join(line + "\n" for line in kept).encode())

    # ---- the loop ----

    def _set_lr(self) -> float:
        lr = 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr_at(self.step, group["peak_lr"])
            lr = max(lr, group["lr"])
        return lr

    def train_step(self) -> dict[str, float]:
        cfg, model = self.cfg, self.ddp or self.model
        lr = self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, float] = {}
        batches = [self.data(self.step, micro, self.rank, self.world, self.micro_batch) for micro in range(cfg.grad_accum)]
        scales = self._loss_scales(batches)
        for micro, batch in enumerate(batches):
            sync = micro == cfg.grad_accum - 1
            with self._gradient_sync(sync):
                with torch.autocast("cuda" if next(self.model.parameters()).is_cuda else "cpu",
                                    dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                    loss, metrics = self.step_fn(model, batch)
                (loss * scales[micro] / cfg.grad_accum).backward()
            totals["loss"] = totals.get("loss", 0.0) + loss.item() * scales[micro] / cfg.grad_accum
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
        if cfg.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_([p for p, _ in self.named.values()], cfg.grad_clip)
            totals["grad_norm"] = float(_full(norm))
        self.optimizer.step()
        if self.after_step is not None:
            self.after_step(self.model)
        self.step += 1
        if self.world > 1:  # every rank logs the mean over ranks
            import torch.distributed as dist

            t = torch.tensor([totals["loss"]], dtype=torch.float64)
            dist.all_reduce(t)
            totals["loss"] = float(t) / self.world
        return {"lr": lr, **totals}

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool):
        """Accumulate gradients locally (no reduction across ranks) unless `sync`."""
        if sync or self.world == 1:
            yield
        elif self.ddp is not None:
            with self.ddp.no_sync():
                yield
        else:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)

    def _loss_scales(self, batches: list) -> list[float]:
        """Per-micro-batch loss multipliers. A batch that is a dict with "num_items" (e.g. labelled
        tokens) has a loss that is a mean over its own items; weighting each by its share of all
        items in the global batch (every micro-batch of every rank) makes the optimised loss the
        mean over the global batch, however it is split: N processes, or gradient accumulation,
        equal one big batch. Other batches (contrastive: the loss already spans the gathered
        global batch) count equally."""
        counts = [float(b["num_items"]) if isinstance(b, dict) and "num_items" in b else None for b in batches]
        if any(c is None for c in counts):
            return [1.0] * len(batches)
        total = sum(counts)
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(t)
            total = float(t)
        return [c * len(batches) * self.world / max(total, 1.0) for c in counts]

    def fit(self, resume: bool = False, progress: bool = True) -> list[dict[str, Any]]:
        """Train to `cfg.steps`; returns the metrics logged in this call."""
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.cfg.seed)
        if resume:
            self.load_checkpoint()
        elif self.is_main and (self.out / METRICS).exists():
            (self.out / METRICS).unlink()
        self.model.train()
        logged: list[dict[str, Any]] = []
        bar = _Progress(self.cfg.steps, self.step, enabled=progress and self.is_main)
        t0, seen = time.perf_counter(), 0
        with bar:
            while self.step < self.cfg.steps:
                m = self.train_step()
                seen += self.cfg.batch_size
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.update(self.step, m["loss"], rate, self.unit)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    record = {"step": self.step, **{k: round(v, 6) for k, v in m.items()},
                              f"{self.unit}_per_s": round(rate, 2)}
                    logged.append(record)
                    if self.is_main:
                        with open(self.out / METRICS, "a") as fh:
                            fh.write(json.dumps(record) + "\n")
                if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
                    if self.is_main:
                        plot_metrics(self.out / METRICS, self.out / LOSS_PLOT)
        self.model.eval()
        self.plain.eval()
        return logged


def _fully_shard(model: nn.Module) -> nn.Module:
    """A copy of `model` sharded by FSDP (torch's `fully_shard`) over all ranks: one unit per
    block of every layer stack, and the root. requires_grad flags carry over (frozen stays frozen)."""
    import copy

    from torch.distributed.fsdp import fully_shard

    sharded = copy.deepcopy(model)
    for module in list(sharded.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(True for _ in block.parameters()):
                    fully_shard(block)
    fully_shard(sharded)
    return sharded


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """`full` laid out as parameter `p` is: sharded the same way if `p` is a DTensor."""
    full = full.to(p.dtype)
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, p.device_mesh, p.placements)
    return full


class _Progress:
    """A rich progress bar with loss and throughput, or nothing (other ranks, tests)."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=start, info="")

    def __enter__(self):
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)
        return False

    def update(self, step: int, loss: float, rate: float, unit: str) -> None:
        if self.enabled:
            self.progress.update(self.task, completed=step, info=f"loss {loss:.4f}  {rate:.1f} {unit}/s")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics: str | Path, out: str | Path, key: str = "loss", size: tuple[int, int] = (640, 360)) -> None:
    """A loss-curve PNG drawn with Pillow (no plotting dependency): `key` against step."""
    from PIL import Image, ImageDraw

    rows = [r for r in read_metrics(metrics) if key in r] if Path(metrics).is_file() else []
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 60, w - 20, 20, h - 40
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    if len(rows) >= 1:
        xs, ys = [r["step"] for r in rows], [r[key] for r in rows]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def pt(x: float, y: float) -> tuple[float, float]:
            return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

        draw.line([pt(x, y) for x, y in zip(xs, ys)], fill=(30, 90, 200), width=2)
        draw.text((5, top), f"{y1:.3g}", fill=(0, 0, 0))
        draw.text((5, bottom - 10), f"{y0:.3g}", fill=(0, 0, 0))
        draw.text((left, bottom + 5), f"step {x0}", fill=(0, 0, 0))
        draw.text((right - 70, bottom + 5), f"step {x1}", fill=(0, 0, 0))
    draw.text((left + 5, top + 5), key, fill=(0, 0, 0))
    img.save(out)

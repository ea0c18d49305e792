"""The decode loop, and continuous batching: requests join and leave a running batch between
decode steps.

A `Row` is one answer being generated: prompt ids, images, sampling options, and the
tokens so far. `Batch` holds the rows decoded together: one KV cache whose rows are right-aligned
(a shorter history is padded in front and masked out), the padding mask, and every row's
next-token logits. `Batch.add` prefills new sequences together and merges them in; `Batch.step`
samples one token per row, hands each sequence its text, drops finished rows and runs one decode
forward for the others. `Batch.run` is static batching (what `generate` and `ask` do: all
rows prefilled together, decoded until the last finishes); `Engine` runs the loop on a thread
behind a bounded queue, admitting rows as they come: what `vlmlab serve` uses so that
concurrent users share the CPU or GPU.

A row's tokens do not depend on its neighbours: positions come from the row's own mask, padding
is masked out of attention, and each row samples with its own seeded generator, so an answer
equals what `LanguageModel.generate` / `VisionLanguageModel.ask` give for the same request, up
to floating-point rounding: the CPU's matrix kernels change with the batch's shape, so the sums
of a row can round differently alone and in a batch. In float32 that never changed an answer in
our tests (tiny models, and 24 of 24 greedy SmolLM2 captions batched by 8); in bfloat16 a near
tie between two tokens sometimes flips (a few of 8 batched 64-token captions differ).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from vlmlab.errors import BusyError, InputError, PromptTooLongError, VlmlabError
from vlmlab.infer.generate import GenerationConfig, GenerationResult, TextStream, cache_dtype, sample
from vlmlab.nn.attention import KVCache
from vlmlab.nn.packed import release_freed_memory

if TYPE_CHECKING:
    from vlmlab.infer.lm import LanguageModel

log = logging.getLogger(__name__)

HEADROOM = 64  # cache positions allocated ahead, so the cache grows every 64 steps, not every step
RATE_WINDOW_S = 10.0  # the window of `Engine.tokens_per_s`


@dataclass(eq=False)
class Row:
    """One answer being generated. `on_event(seq, text, done)` is called from the engine's thread
    with each new piece of text, and once more with done=True when the row finishes
    (`finish_reason`: "stop", "length", "cancelled", "timeout" or "error", then `error` says why).
    Set `cancelled` from any thread to free the row before its next step."""

    prompt: list[int]
    cfg: GenerationConfig
    pixel_values: torch.Tensor | None = None
    on_event: Callable[["Row", str, bool], None] | None = None
    deadline: float | None = None  # time.monotonic() after which the row stops with "timeout"
    seed_offset: int = 0  # choice i of a request samples with seed + i, as row i of a batch does
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: VlmlabError | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None

    def result(self) -> GenerationResult:
        n = len(self.tokens) + (self.finish_reason == "stop" and not self.stream.stopped)
        span = (self.last_token_at or 0) - (self.first_token_at or 0)
        return GenerationResult(
            self.stream.text, list(self.tokens), len(self.prompt), self.finish_reason or "length",
            (self.first_token_at or time.perf_counter()) - self.created, (n - 1) / span if n > 1 and span > 0 else 0.0,
        )

    # ---- used by Batch ---------------------------------------------------------------------------

    def start(self, tokenizer, context: int, vocab: int, device) -> None:
        self.stream = TextStream(tokenizer, self.cfg.stop_strings)
        self.limit = min(self.cfg.max_new_tokens, context - len(self.prompt))
        self.generator = None
        if self.cfg.temperature > 0:
            base = self.cfg.seed if self.cfg.seed is not None else int(torch.seed() % 2**62)
            self.generator = torch.Generator(device=device).manual_seed(base + self.seed_offset)
        self.seen = None
        if self.cfg.repetition_penalty != 1.0:
            self.seen = torch.zeros((1, vocab), dtype=torch.bool, device=device)
            self.seen[0, torch.as_tensor(self.prompt, device=device)] = True

    @property
    def greedy(self) -> bool:
        return self.cfg.temperature == 0 and self.cfg.repetition_penalty == 1.0

    def accept(self, token: int) -> None:
        """Take the sampled token; emit the text it completes; finish on a stop token, a stop
        string, or the length limit."""
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.last_token_at = now
        if token in self.cfg.stop_token_ids:
            return self.finish("stop")
        self.tokens.append(token)
        if self.seen is not None:
            self.seen[0, token] = True
        delta = self.stream.push(token)
        if self.stream.stopped:
            return self.finish("stop", delta)
        if len(self.tokens) >= self.limit:
            return self.finish("length", delta)
        if delta and self.on_event:
            self.on_event(self, delta, False)

    def finish(self, reason: str, delta: str = "", error: VlmlabError | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason, self.error = reason, error
        if hasattr(self, "stream") and reason in ("stop", "length"):
            delta += self.stream.flush()
        if self.on_event:
            self.on_event(self, delta, True)


class Batch:
    """The rows decoded together, and the two operations of continuous batching. Making one packs
    the model's linears for inference (`LanguageModel.pack`)."""

    def __init__(self, model: "LanguageModel"):
        model.pack()
        self.model = model
        self.net = model.net
        self.device = next(self.net.parameters()).device
        self.pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (rows, cache length) True at real positions
        self.logits: torch.Tensor | None = None  # (rows, vocab): each row's next-token logits

    def __len__(self) -> int:
        return len(self.rows)

    def check(self, seq: Row) -> None:
        """Refuse a sequence that cannot run (before it waits in a queue)."""
        seq.cfg.validate()
        if not seq.prompt:
            raise InputError("the prompt has no tokens")
        context = self.net.context_length
        if len(seq.prompt) >= context:
            raise PromptTooLongError(f"the prompt has {len(seq.prompt)} tokens but the model's context is "
                                     f"{context} tokens; shorten the prompt")

    def run(self, rows: list[Row]) -> Iterator[None]:
        """Static batching: prefill `rows` together, then decode until every row has finished,
        yielding after each step. Raises the error of a row that could not start."""
        for row in rows:
            self.check(row)
        self.add(rows)
        for row in rows:
            if row.error is not None:
                raise row.error
        while len(self):
            self.step()
            yield

    @torch.inference_mode()
    def add(self, seqs: list[Row]) -> None:
        """Prefill `seqs` together and merge them into the running batch. A group whose prefill
        fails is retried one by one, so only the bad sequence fails (with its error)."""
        try:
            cache, mask, logits = self._prefill(seqs)
        except VlmlabError as e:
            if len(seqs) == 1:
                return seqs[0].finish("error", error=e)
            for seq in seqs:
                self.add([seq])
            return
        for seq in seqs:
            seq.start(self.model.tokenizer, self.net.context_length, logits.shape[-1], self.device)
        if self.cache is None:
            cache.reserve(cache.length + HEADROOM)
            self.cache, self.mask, self.logits = cache, mask, logits
        else:
            length = max(self.cache.length, cache.length)
            self.cache = KVCache.merge([self.cache, cache], capacity=length + HEADROOM)
            self.mask = torch.cat([_pad_front(self.mask, length), _pad_front(mask, length)])
            self.logits = torch.cat([self.logits, logits])
        self.rows += seqs

    def _prefill(self, seqs: list[Row]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        # Rows with the same prompt and images (the n choices of one request) are computed once.
        keys = [(tuple(s.prompt), id(s.pixel_values)) for s in seqs]
        unique = {key: i for i, key in reversed(list(enumerate(keys)))}
        if len(unique) < len(seqs):
            order = list(unique)
            cache, mask, logits = self._prefill([seqs[unique[key]] for key in order])
            index = torch.tensor([order.index(key) for key in keys], device=self.device)
            cache.select(index)
            return cache, mask[index], logits[index]
        longest = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), longest), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((len(seqs), longest), dtype=torch.bool, device=self.device)
        for i, s in enumerate(seqs):
            ids[i, longest - len(s.prompt):] = torch.as_tensor(s.prompt, dtype=torch.long)
            mask[i, longest - len(s.prompt):] = True
        pixels = [s.pixel_values for s in seqs if s.pixel_values is not None]
        extra = {"pixel_values": torch.cat(pixels).to(self.device)} if pixels else {}
        cache = self.net.new_cache(longest, dtype=cache_dtype(self.net))
        logits = self.net(ids, attention_mask=None if mask.all() else mask, cache=cache, logits_to_keep=1, **extra)
        return cache, mask, logits[:, -1].float()

    @torch.inference_mode()
    def step(self) -> int:
        """One token for every row, then one decode forward for the rows still running; returns
        how many tokens the rows took (stop tokens are not counted)."""
        now = time.monotonic()
        greedy = self.logits.argmax(dim=-1).tolist()
        before = sum(len(seq.tokens) for seq in self.rows)
        for i, seq in enumerate(self.rows):
            if seq.cancelled:
                seq.finish("cancelled")
            elif seq.deadline is not None and now > seq.deadline:
                seq.finish("timeout")
            elif seq.greedy:
                seq.accept(greedy[i])
            else:
                seq.accept(int(sample(self.logits[i:i + 1], seq.cfg, seq.seen, [seq.generator])))
        taken = sum(len(seq.tokens) for seq in self.rows) - before
        keep = [i for i, seq in enumerate(self.rows) if seq.finish_reason is None]
        if not keep:
            self.rows, self.cache, self.mask, self.logits = [], None, None, None
            return taken
        if len(keep) < len(self.rows):
            rows = torch.tensor(keep, device=self.device)
            mask = self.mask.index_select(0, rows)
            drop = int(mask.any(dim=0).long().argmax())  # leading positions that are padding in every kept row
            self.cache.select(rows, drop_front=drop)
            self.mask = mask[:, drop:]
            self.rows = [self.rows[i] for i in keep]
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        if self.mask.shape[1] > self.cache.capacity:
            self.cache.reserve(self.mask.shape[1] + HEADROOM)
        ids = torch.tensor([[seq.tokens[-1]] for seq in self.rows], device=self.device)
        mask = None if self.mask.all() else self.mask
        self.logits = self.net(ids, attention_mask=mask, cache=self.cache)[:, -1].float()
        return taken

    def fail_all(self, error: VlmlabError) -> None:
        for seq in self.rows:
            seq.finish("error", error=error)
        self.rows, self.cache, self.mask, self.logits = [], None, None, None


def _pad_front(mask: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([mask.new_zeros(mask.shape[0], length - mask.shape[1]), mask], dim=1)


class Engine:
    """A `Batch` driven by a background thread: `submit` queues a sequence, or raises `BusyError`
    when every row is taken and `max_queue` sequences already wait for one; between decode
    steps, waiting sequences join the batch up to `max_batch` rows. max_batch=1 decodes one
    request at a time (no batching)."""

    def __init__(self, model: "LanguageModel", *, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.batch = Batch(model)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.waiting: deque[Row] = deque()
        self.joining: list[Row] = []  # admitted, being prefilled (in neither `waiting` nor the batch yet)
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.generated_tokens = 0  # counters read by the server's /metrics
        self.busy_s = 0.0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step, the last RATE_WINDOW_S

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running(self) -> int:
        """Rows that hold a place: being prefilled, or decoding and not yet finished. A row that
        finished during a step frees its place at once, though it leaves the batch only after the
        step's forward: its client may already be sending the next request."""
        return len(self.joining) + sum(1 for seq in self.batch.rows if seq.finish_reason is None)

    def tokens_per_s(self) -> float:
        """Tokens generated per second over the last RATE_WINDOW_S seconds."""
        horizon = time.monotonic() - RATE_WINDOW_S
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        return sum(n for _, n in list(self.recent)) / RATE_WINDOW_S

    def submit(self, seq: Row) -> None:
        self.batch.check(seq)
        with self.cond:
            running = self.running
            free_rows = max(0, self.max_batch - running)
            if len(self.waiting) >= self.max_queue + free_rows:
                raise BusyError(f"the server is busy: {running} requests are running and "
                                f"{len(self.waiting)} waiting (max_batch={self.max_batch}, max_queue={self.max_queue}); "
                                "retry shortly")
            self.waiting.append(seq)
            self.cond.notify()

    def start(self) -> "Engine":
        if self.thread is None:
            self.stopping = False
            self.thread = threading.Thread(target=self._loop, name="vlmlab-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        stopped = VlmlabError("the server is shutting down")
        for seq in list(self.waiting):
            seq.finish("error", error=stopped)
        self.waiting.clear()
        self.batch.fail_all(stopped)

    def _admit(self) -> list[Row]:
        """Waiting sequences that join now (cancelled or expired ones are finished, not admitted)."""
        joining = []
        now = time.monotonic()
        while self.waiting and self.running + len(joining) < self.max_batch:
            seq = self.waiting.popleft()
            if seq.cancelled:
                seq.finish("cancelled")
            elif seq.deadline is not None and now > seq.deadline:
                seq.finish("timeout")
            else:
                joining.append(seq)
        return joining

    def _loop(self) -> None:
        while True:
            with self.cond:
                if not self.waiting and not len(self.batch):
                    release_freed_memory()  # idle: hand the freed KV caches' pages back to the OS
                while not self.stopping and not self.waiting and not len(self.batch):
                    self.cond.wait()
                if self.stopping:
                    return
                joining = self.joining = self._admit()
            start = time.perf_counter()
            try:
                if joining:
                    self.batch.add(joining)
                self.joining = []
                if len(self.batch):
                    produced = self.batch.step()
                    self.generated_tokens += produced
                    self.recent.append((time.monotonic(), produced))
            except Exception as e:  # a bug must not take the server down: fail the rows, keep serving
                log.exception("generation failed")
                self.joining = []
                for seq in joining:
                    seq.finish("error", error=VlmlabError(f"generation failed: {type(e).__name__}: {e}"))
                self.batch.fail_all(VlmlabError(f"generation failed: {type(e).__name__}: {e}"))
            self.busy_s += time.perf_counter() - start

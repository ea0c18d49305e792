"""`SceneStream`: an endless, deterministic, sharded stream of generated samples for training.

Sample n of the stream is ``generate_sample(mix.pick(seed), seed, split, config)`` with
``seed = base_seed + n``: its content depends only on n, never on how many workers or ranks
read the stream. Shard s of S (S = world_size x DataLoader workers, s = rank x workers + worker)
takes n = s, s + S, s + 2S, ..., so no two workers or ranks produce the same sample and together
they produce each sample exactly once.

With `dialogue_turns` = k > 1, a sample whose task has a question function (`tasks.ASKERS`)
becomes a conversation of up to k questions about one scene, their tasks drawn from the mix's
such tasks (`generate_dialogue`); other tasks stay single samples.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlmlab.data.scenes.sample import Sample
from vlmlab.data.scenes.scene import SPLITS, SceneConfig, split_seed
from vlmlab.data.scenes.tasks import ASKERS, TaskMix, generate_dialogue, generate_sample
from vlmlab.errors import InputError


class SceneStream(IterableDataset):
    """Infinite stream of `Sample`s (images rendered in the worker when `render` is true).

    Samples are not tensors: give the DataLoader a ``collate_fn`` (e.g. ``list``, or a model's
    collator). `rank` / `world_size` shard across distributed processes (default: taken from
    torch.distributed when it is initialised, else 0 / 1).
    """

    def __init__(self, split: str = "train", mix: TaskMix | None = None, config: SceneConfig | None = None,
                 base_seed: int = 0, rank: int | None = None, world_size: int | None = None, render: bool = True,
                 dialogue_turns: int = 1):
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        split_seed(split, base_seed)  # validates the start of the range
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0 if rank is None else rank
            world_size = torch.distributed.get_world_size() if dist else 1 if world_size is None else world_size
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise InputError(f"SceneStream needs 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.split, self.mix, self.config = split, mix or TaskMix(), config or SceneConfig()
        self.base_seed, self.rank, self.world_size, self.render = base_seed, rank, world_size, render
        if isinstance(dialogue_turns, bool) or not isinstance(dialogue_turns, int) or dialogue_turns < 1:
            raise InputError(f"dialogue_turns must be a positive integer, got {dialogue_turns!r}")
        self.dialogue_turns = dialogue_turns
        self._askable = {t: w for t, w in self.mix.weights.items() if t in ASKERS}

    def sample(self, n: int) -> Sample:
        """Sample n of the stream (whichever shard would produce it)."""
        seed = self.base_seed + n
        task = self.mix.pick(split_seed(self.split, seed))
        if self.dialogue_turns > 1 and task in self._askable:
            s = generate_dialogue(self._askable, self.dialogue_turns, seed, self.split, self.config)
        else:
            s = generate_sample(task, seed, self.split, self.config)
        if self.render:
            s.images  # noqa: B018  (render in the worker process, not in the consumer)
        return s

    def shard(self) -> tuple[int, int]:
        """(this shard's index, number of shards) for the calling DataLoader worker."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[Sample]:
        shard, n_shards = self.shard()
        n = shard
        while True:
            yield self.sample(n)
            n += n_shards

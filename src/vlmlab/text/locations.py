"""Location tokens: one vocabulary entry per quantised coordinate, so that a language model
writes a box as four tokens instead of a dozen digits, and a point as two (Pix2Seq, Chen et al.
2022; Kosmos-2; PaliGemma's <loc0000>-<loc1023>; Florence-2's 1,000 bins).

Text keeps the location formats of `data.coords`: `LocationTokenizer` encodes every box
``(x0,y0),(x1,y1)`` (0-1000) in a text as four location ids and every coordinate of a point tag
(``<point x="80.6" y="24.3" ...>``, percentages: 0-1000 in tenths) as one, and decodes them back
to that text, so training data, prompts, answer parsers and what a user reads stay as they are;
only the model's tokens change. With `bins` = n, coordinate v (0-1000) is location token
round(v (n - 1) / 1000), id base vocabulary + that; n = 1001 is exact, n = 101 rounds to tens
(2.2 px of a 224-px image).

The network side is `LlamaModel.add_tokens`: the n embeddings are a parameter of their own after
the base vocabulary's rows, read as input embeddings and (tied) as output head rows, so that they
train with their own learning rate while the language model stays frozen, and a parts folder
stores them beside the projector. `ruler_embeddings` starts them on the digits' embeddings:
coordinate v in the direction of the point at v / 100 along the line through the embeddings of
"0", "1", ..., "9", so a model that writes a box's first digit scores at first the location
tokens of that tenth of the image highest.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import torch

from vlmlab.data.coords import BOX_PATTERN, BOX_SCALE, POINT_COORD_PATTERN, POINT_SCALE, POINT_TAG_PATTERN
from vlmlab.errors import ConfigError, InputError

# A decoded run of location tokens outside a point tag: the k-th token of each four opens or
# closes its corner, so that every prefix of a run decodes to a prefix of the whole box (streamed
# text only grows).
_RUN = ("({}", ",{})", ",({}", ",{})")
_LOCATIONS = re.compile(f"{BOX_PATTERN.pattern}|{POINT_TAG_PATTERN.pattern}")
_TENTHS = BOX_SCALE / POINT_SCALE  # a percentage in location units


class LocationTokenizer:
    """A checkpoint's `Tokenizer` with `bins` location tokens after its vocabulary (see the module
    docstring). Everything not about ids (chat template, special tokens, ...) is the base's."""

    def __init__(self, base: Any, bins: int):
        if isinstance(bins, bool) or not isinstance(bins, int) or not 2 <= bins <= BOX_SCALE + 1:
            raise ConfigError(f"location tokens: bins must be an integer from 2 to {BOX_SCALE + 1}, got {bins!r}")
        self.base, self.bins = base, bins
        self.first_id = base.vocab_size  # the location tokens' ids: first_id .. first_id + bins - 1

    def __getattr__(self, name: str) -> Any:  # chat template, special token ids, source, ...
        if name == "base":  # not yet set (unpickling, copying)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"LocationTokenizer({self.base!r}, bins={self.bins})"

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def vocab_size(self) -> int:
        return self.first_id + self.bins

    def location_id(self, value: float) -> int:
        """The token of coordinate `value` (0-1000)."""
        return self.first_id + round(min(max(value, 0), BOX_SCALE) * (self.bins - 1) / BOX_SCALE)

    def location_value(self, token_id: int) -> int:
        """The coordinate (0-1000) that location token `token_id` stands for."""
        return round((token_id - self.first_id) * BOX_SCALE / (self.bins - 1))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The base's ids of `text`, each box four location ids instead and each point coordinate one."""
        if not isinstance(text, str):
            return self.base.encode(text)  # the base names the wrong type
        ids: list[int] = []
        start = 0
        for m in _LOCATIONS.finditer(text):
            ids += self._base_encode(text[start:m.start()])
            if m.group(1) is not None:  # a box
                ids += [self.location_id(int(v)) for v in m.groups()[:4]]
            else:  # a point tag: its coordinates
                tag, at = m.group(0), 0
                for c in POINT_COORD_PATTERN.finditer(tag):
                    ids += self._base_encode(tag[at:c.start()]) + [self.location_id(float(c.group(1)) * _TENTHS)]
                    at = c.end()
                ids += self._base_encode(tag[at:])
            start = m.end()
        ids += self._base_encode(text[start:])
        if add_special_tokens:  # the base's BOS / EOS around the whole text
            base = self.base
            ids = [base.bos_token_id] * base.add_bos_token + ids + [base.eos_token_id] * base.add_eos_token
        return ids

    def _base_encode(self, text: str) -> list[int]:
        return self.base.encode(text) if text else []

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False,
                     max_length: int | None = None) -> list[list[int]]:
        if max_length is not None:
            raise ConfigError("a tokenizer with location tokens does not truncate batches (max_length)")
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`: the base's, a location token right after ``="`` written as a point's
        percentage, every other run of them as boxes."""
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise InputError(f"token ids must be non-negative, got {min(ids)}")
        out: list[str] = []
        pending: list[int] = []
        run = 0
        for i in [*ids, -1]:  # -1: the end, where pending base ids are written out
            is_location = self.first_id <= i < self.vocab_size
            if pending and (is_location or i == -1):
                out.append(self.base.decode(pending, skip_special_tokens=skip_special_tokens))
                pending = []
            if is_location and out and out[-1].endswith('="'):
                out.append(f"{self.location_value(i) / _TENTHS:.1f}")
            elif is_location:
                out.append(_RUN[run % 4].format(self.location_value(i)))
                run += 1
            elif i != -1:
                pending.append(i)
                run = 0
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token.startswith("<loc") and token.endswith(">") and token[4:-1].isdigit() and int(token[4:-1]) < self.bins:
            return self.first_id + int(token[4:-1])
        return self.base.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if self.first_id <= token_id < self.vocab_size:
            return f"<loc{token_id - self.first_id:04d}>"
        return self.base.id_to_token(token_id)

    def save(self, folder) -> None:
        self.base.save(folder)  # the location tokens are the model config's (vlmlab_location_tokens)


def ruler_embeddings(embeddings: torch.Tensor, digit_ids: list[int], bins: int) -> torch.Tensor:
    """(bins, width) starting rows for the location tokens: bin b's coordinate v at t = v / 100 on
    the digit ruler, the direction of (1 - f) e(floor t) + f e(floor t + 1) with f = t - floor t
    (e: the embedding of a digit's token; v = 1000 is e(9) + (e(9) - e(8))), every row of the
    digits' mean norm. Equal norms matter: a tied head scores token b by h . e_b, and a row on a
    chord between two others is never the highest score for any h (with the chord rows themselves
    only the ten digit points could be chosen); rows on a sphere each win for h along them."""
    if len(digit_ids) != 10:
        raise ConfigError(f"location tokens start on the ten digits' embeddings; got {len(digit_ids)} ids")
    digits = embeddings[torch.tensor(digit_ids)].float()
    t = torch.arange(bins, dtype=torch.float32) * (BOX_SCALE / 100) / (bins - 1)
    low = t.floor().clamp(max=8).long()
    f = (t - low)[:, None]
    rows = (1 - f) * digits[low] + f * digits[low + 1]
    rows = rows / rows.norm(dim=1, keepdim=True) * digits.norm(dim=1).mean()
    return rows.to(embeddings.dtype)


def digit_ids(tokenizer) -> list[int]:
    """The ids of the single-token digits "0".."9" (ConfigError if the tokenizer splits one)."""
    ids = []
    for d in range(10):
        encoded = tokenizer.encode(str(d))
        if len(encoded) != 1:
            raise ConfigError(f"the tokenizer splits {str(d)!r} into {len(encoded)} tokens; digit-valued tokens "
                              "(number loss, location tokens) need single-token digits")
        ids.append(encoded[0])
    return ids


def with_locations(tokenizer, bins: int):
    """`tokenizer` with `bins` location tokens (itself for 0: boxes as digits)."""
    return LocationTokenizer(tokenizer, bins) if bins else tokenizer


def add_location_tokens(model, bins: int) -> None:
    """Give a LLaVA `VisionLanguageModel` `bins` location tokens: its config's `location_tokens`,
    their embeddings started on the digit ruler (`ruler_embeddings`), its tokenizer wrapped. A
    recipe trains them with the parameter group "language_model.model.added_embeddings"."""
    tokenizer = LocationTokenizer(model.tokenizer, bins)  # checks bins
    with model.unpacked() as net:
        if getattr(net.cfg, "location_tokens", None) != 0:
            raise ConfigError(f"{model.name}: location tokens need a LLaVA model without them")
        lm = net.language_model.model
        rows = ruler_embeddings(lm.embed_tokens.weight.detach(), digit_ids(model.tokenizer), bins)
        lm.add_tokens(rows)
        net.cfg.location_tokens = bins
    model.tokenizer = tokenizer

"""`VisionLanguageModel`: a LLaVA-style network with its tokenizer and image processor. It answers
about images (`ask`), chats, and, without images, generates text like any `LanguageModel`.

Messages carry images as "<image>" markers in their text (the LLaVA convention; `ask` puts one
per image before the question when the prompt has none). The chat template renders the
conversation; each marker then becomes the image's token ids (`image_inputs`): LLaVA's
`image_token_id` repeated once per image feature, or what the family's processor writes (an
Idefics3 image: its tiles' tags and placeholders). The images' features replace the placeholders
in the first forward pass.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any, Sequence

import torch

from PIL import Image

from vlmlab.data.coords import find_boxes, parse_points
from vlmlab.errors import InputError, VlmlabError
from vlmlab.infer.generate import GenerationResult
from vlmlab.infer.lm import LanguageModel
from vlmlab.vision.preprocess import ImageProcessor, load_image

IMAGE_MARKER = "<image>"


def splice_images(tokenizer, text: str, image_ids: list[list[int]]) -> list[int]:
    """Token ids of rendered prompt text, the i-th "<image>" marker replaced by `image_ids[i]`."""
    parts = text.split(IMAGE_MARKER)
    if len(parts) - 1 != len(image_ids):
        raise InputError(f"the prompt has {len(parts) - 1} {IMAGE_MARKER} marker(s) but {len(image_ids)} image(s) "
                         "were given")
    ids: list[int] = []
    for i, part in enumerate(parts):
        if part:
            ids += tokenizer.encode(part, add_special_tokens=False)
        if i < len(image_ids):
            ids += image_ids[i]
    return ids


_PROBE = "\x1fvlmlab-probe"


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render messages whose content is text with "<image>" markers through the checkpoint's
    chat template. Templates of VLM checkpoints (llava-hf, SmolVLM) expect content as a list of
    parts, [{"type": "image"}, {"type": "text", "text": ...}], and write their own image marker
    for each image part; for those the markers become image parts. Text-only templates
    (SmolLM2's) get the strings as they are."""
    if _takes_parts(tokenizer, tokenizer.chat_template):
        messages = [{**m, "content": _parts(m["content"])} if isinstance(m.get("content"), str) else m
                    for m in messages]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


@lru_cache(maxsize=32)
def _takes_parts(tokenizer, template: str | None) -> bool:
    """Whether `template` renders content given as parts (probed once per tokenizer and template)."""
    probe = [{"role": "user", "content": [{"type": "text", "text": _PROBE}]}]
    try:
        out = tokenizer.apply_chat_template(probe, add_generation_prompt=False)
    except VlmlabError:
        return False
    return _PROBE in out and "'type'" not in out  # not just printing the list's repr


def _parts(text: str) -> list[dict]:
    pieces = text.split(IMAGE_MARKER)
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def with_image_markers(prompt: str | list[dict], n_images: int) -> str | list[dict]:
    """A question without "<image>" markers gets one per image in front of it."""
    if isinstance(prompt, str) and n_images and IMAGE_MARKER not in prompt:
        return IMAGE_MARKER * n_images + "\n" + prompt
    return prompt


class VisionLanguageModel(LanguageModel):
    kind = "vision-language-model"

    def __init__(self, net: torch.nn.Module, tokenizer, processor: ImageProcessor | Any, name: str = "model"):
        """`processor`: an `ImageProcessor`, or a family's own with `prompt_images` (see `image_inputs`)."""
        super().__init__(net, tokenizer, name=name)
        self.processor = processor

    @property
    def image_token_id(self) -> int:
        return self.net.cfg.image_token_id

    def features_per_image(self, pixel_values: torch.Tensor) -> int:
        vision, fold = self.net.cfg.vision, self.net.cfg.patch_size_in_features
        grid = (pixel_values.shape[-2] // fold) * (pixel_values.shape[-1] // fold)
        keep_first = self.net.cfg.vision_feature_select_strategy == "full"
        return grid + int(vision.class_token and keep_first)

    def image_inputs(self, images: list) -> tuple[torch.Tensor, list[list[int]]]:
        """Pixel values of `images` and, per image, the token ids its "<image>" marker becomes.
        A processor with its own prompt layout decides both (`processor.prompt_images(images,
        tokenizer)`: Idefics3's tiles); otherwise (LLaVA) each image is one `image_token_id`
        per image feature."""
        prompt_images = getattr(self.processor, "prompt_images", None)
        if prompt_images is not None:
            pixels, image_ids = prompt_images(images, self.tokenizer)
            return pixels.to(self.dtype), image_ids
        pixels = self.processor(images).to(self.dtype)
        return pixels, [[self.image_token_id] * self.features_per_image(pixels)] * len(images)

    def prepare(self, prompt: str | list[dict], images: Sequence = (), *, system: str | None = None,
                chat: bool = True) -> tuple[list[int], torch.Tensor | None]:
        """Token ids of one prompt (its "<image>" markers expanded into the images' token ids)
        and the images' pixel values (None without images)."""
        pixels, image_ids = self.image_inputs(list(images)) if images else (None, [])
        if not chat:
            text = prompt
        else:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            if system is not None:
                messages = [{"role": "system", "content": system}, *messages]
            text = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        return splice_images(self.tokenizer, text, image_ids), pixels

    def ask(self, prompt: str | list[dict], images: Any = (), *, system: str | None = None,
            stop: Sequence[str] | None = None, **kwargs) -> GenerationResult:
        """Answer a question (or continue chat messages) about `images` (PIL images, paths or
        bytes; one or a list). A question without "<image>" markers gets one per image in front
        of it. `ask(image, "question")` (image first) works too."""
        if isinstance(images, str):  # ask(image, "question")
            prompt, images = images, prompt
        if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
            images = [images]
        images = [im if isinstance(im, Image.Image) else load_image(im) for im in images]  # decoded once
        prompt = with_image_markers(prompt, len(images))
        *_, results = self._run([prompt], system=system, chat=True, stop=stop, kwargs=kwargs, images=[images])
        return self.locate(results[0], images)

    def locate(self, result: GenerationResult, images: Sequence[Any]) -> GenerationResult:
        """Fill `result.boxes` / `.points` with the locations its text names, mapped from the
        model's view (0-1000 boxes, percentage points; coords.py) to the first image's pixels."""
        result.boxes, result.points = [], []
        if not images:
            return result
        image = images[0] if isinstance(images[0], Image.Image) else load_image(images[0])
        left, top, right, bottom = self.processor.view(image.width, image.height)
        w, h = right - left, bottom - top
        result.boxes = [(x0 + left, y0 + top, x1 + left, y1 + top) for x0, y0, x1, y1 in find_boxes(result.text, w, h)]
        result.points = [(x + left, y + top) for x, y in parse_points(result.text, w, h) or []]
        return result

    def save(self, folder) -> None:
        super().save(folder)
        self.processor.to_folder(folder)

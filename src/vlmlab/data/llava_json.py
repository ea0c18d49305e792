"""LLaVA-style conversation datasets: a ``data.json`` list of records plus image files.

A record (as in LLaVA's instruction-tuning data)::

    {"id": "train-000000007-count",
     "image": "images/train-000000007-count.png",          # or a list of paths, or absent
     "conversations": [{"from": "human", "value": "<image>\\nHow many red circles are there?"},
                       {"from": "gpt", "value": "3"}],
     "vlmlab": {"task": "vqa", "answers": [null, {...}], "scenes": [{...}]}}

The "vlmlab" key is ours: the sample's task family, one `Answer` dict (or null) per turn and the
scene graph of each image, so reading gives back the same `Sample` objects, ground truth
included. Plain LLaVA JSON from elsewhere (no "vlmlab" key) reads as samples without answers.
Image paths are relative to the JSON file's folder unless `image_root` says otherwise; images
are checked to exist when read and decoded on first use (`Sample.images`) or at once with
``verify_images=True``. Every problem is a `DataError` naming the file and the record.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from vlmlab.data.scenes.sample import IMAGE_TOKEN, Answer, Sample, Turn
from vlmlab.data.scenes.scene import Scene
from vlmlab.errors import DataError

DATA_FILE = "data.json"
_FROM = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_TO = {"user": "human", "assistant": "gpt"}


def sample_record(sample: Sample, image_paths: list[str]) -> dict[str, Any]:
    """The JSON record of a sample whose images are stored at `image_paths` (relative paths)."""
    rec: dict[str, Any] = {"id": sample.id}
    if image_paths:
        rec["image"] = image_paths[0] if len(image_paths) == 1 else list(image_paths)
    rec["conversations"] = [{"from": _TO[t.role], "value": t.text} for t in sample.turns]
    rec["vlmlab"] = {
        "task": sample.task,
        "answers": [t.answer.to_dict() if t.answer is not None else None for t in sample.turns],
        "scenes": [s.to_dict() for s in sample.scenes],
    }
    return rec


def write_llava_json(samples: Iterable[Sample], out_dir: str | Path, image_dir: str = "images") -> Path:
    """Write ``out_dir/data.json`` and the samples' images as PNGs under ``out_dir/image_dir``.

    One image: ``<id>.png``; several: ``<id>_<k>.png``. Returns the path of data.json.
    """
    out = Path(out_dir)
    (out / image_dir).mkdir(parents=True, exist_ok=True)
    records = []
    for sample in samples:
        images = sample.images
        names = [f"{sample.id}.png"] if len(images) == 1 else [f"{sample.id}_{k}.png" for k in range(len(images))]
        rel = [f"{image_dir}/{n}" for n in names]
        for image, r in zip(images, rel):
            image.save(out / r, format="PNG")
        records.append(sample_record(sample, rel))
    path = out / DATA_FILE
    tmp = path.with_suffix(".json.tmp")
    # One record per line: compact, yet greppable and diffable.
    body = ",\n".join(json.dumps(r, ensure_ascii=False) for r in records)
    tmp.write_text("[\n" + body + "\n]\n" if records else "[]\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _record_sample(rec: Any, index: int, path: Path, root: Path) -> Sample:
    if not isinstance(rec, dict):
        raise DataError(f"{path}: record {index}: expected a JSON object, got {type(rec).__name__}")
    rid = str(rec.get("id", index))
    where = f"{path}: record {index} (id {rid!r})"
    convs = rec.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: missing or empty 'conversations' list")
    turns = []
    for j, c in enumerate(convs):
        if not isinstance(c, dict) or not isinstance(c.get("value"), str):
            raise DataError(f"{where}: conversations[{j}] must be an object with a string 'value'")
        if c.get("from") not in _FROM:
            raise DataError(f"{where}: conversations[{j}] has 'from' = {c.get('from')!r}; "
                            f"expected one of {', '.join(_FROM)}")
        turns.append(Turn(_FROM[c["from"]], c["value"]))

    image = rec.get("image")
    rels = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(rels, list) or not all(isinstance(p, str) for p in rels):
        raise DataError(f"{where}: 'image' must be a path or a list of paths")
    paths = [root / p for p in rels]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{where}: image file {p} does not exist")
    n_tokens = sum(t.text.count(IMAGE_TOKEN) for t in turns if t.role == "user")
    if n_tokens != len(paths):
        raise DataError(f"{where}: {len(paths)} image(s) but {n_tokens} {IMAGE_TOKEN} placeholder(s) in the user turns")

    task, scenes = "llava", []
    extra = rec.get("vlmlab")
    if extra is not None:
        try:
            task = str(extra["task"])
            answers = extra["answers"]
            if len(answers) != len(turns):
                raise ValueError(f"{len(answers)} answers for {len(turns)} turns")
            for t, a in zip(turns, answers):
                t.answer = Answer.from_dict(a) if a is not None else None
            scenes = [Scene.from_dict(s) for s in extra["scenes"]]
        except DataError as e:
            raise DataError(f"{where}: 'vlmlab' scenes: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{where}: malformed 'vlmlab' field: {type(e).__name__}: {e}") from None
    return Sample(id=rid, task=task, scenes=scenes, turns=turns, image_paths=paths, source=where)


def read_llava_json(path: str | Path, image_root: str | Path | None = None, verify_images: bool = False) -> list[Sample]:
    """Samples of a LLaVA JSON file (or of ``data.json`` in a folder).

    verify_images: decode every image now (DataError on the first bad one) instead of on first use.
    """
    path = Path(path)
    if path.is_dir():
        path = path / DATA_FILE
    root = Path(image_root) if image_root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read LLaVA JSON: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text: {e}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    samples = [_record_sample(rec, i, path, root) for i, rec in enumerate(data)]
    if verify_images:
        for s in samples:
            s.images  # noqa: B018  (decodes, raising DataError)
    return samples

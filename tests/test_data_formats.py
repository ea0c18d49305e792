"""LLaVA JSON and image-caption JSONL: round trips, plain LLaVA data, every bad-input path, and
`vlmlab data synth`."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlmlab.cli.main import main
from vlmlab.data.llava_json import read_llava_json, write_llava_json
from vlmlab.data.pairs import ImageTextPair, read_pairs, write_pairs
from vlmlab.data.scenes import TASKS, SceneConfig, generate_sample, image_text_pair
from vlmlab.errors import DataError

CONFIG = SceneConfig(width=96, height=64)


def _samples():
    return [generate_sample(task, i, "val", CONFIG) for i, task in enumerate(TASKS)]


def test_llava_round_trip(tmp_path):
    samples = _samples()
    path = write_llava_json(samples, tmp_path)
    assert path == tmp_path / "data.json"
    back = read_llava_json(tmp_path)
    assert len(back) == len(samples)
    for a, b in zip(samples, back):
        assert (a.id, a.task) == (b.id, b.task)
        assert [(t.role, t.text) for t in a.turns] == [(t.role, t.text) for t in b.turns]
        assert [t.answer for t in a.turns] == [t.answer for t in b.turns]
        assert a.scenes == b.scenes
        assert b.n_images == a.n_images == len(a.scenes)
        assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
        # the scene graphs alone render the same pixels again
        assert [s.render().tobytes() for s in b.scenes] == [im.tobytes() for im in b.images]
    multi = next(r for r in json.loads(path.read_text()) if r["id"].endswith("multi_image_more"))
    assert isinstance(multi["image"], list) and len(multi["image"]) == 2
    assert multi["conversations"][0]["value"].startswith("<image>\n<image>\n")
    assert {c["from"] for c in multi["conversations"]} == {"human", "gpt"}


def _write(tmp_path: Path, records) -> Path:
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records) if not isinstance(records, str) else records)
    return path


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 6), 128).save(path)


def test_plain_llava_json(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    path = _write(tmp_path, [
        {"id": 7, "image": "imgs/a.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A grey square."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "text-only", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ])
    a, b = read_llava_json(path)
    assert a.id == "7" and a.task == "llava" and a.scenes == [] and a.answers == []
    assert [t.role for t in a.turns] == ["user", "assistant", "user", "assistant"]
    assert a.images[0].mode == "RGB" and a.images[0].size == (8, 6)
    assert b.n_images == 0 and b.images == []
    # images relative to another root
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "data.json").write_text(path.read_text())
    assert read_llava_json(other / "data.json", image_root=tmp_path)[0].images[0].size == (8, 6)


@pytest.mark.parametrize("records, message", [
    ('[{"id": "x", "conversations": [', r"data.json: not valid JSON \(.* line 1"),
    ({"id": "x"}, r"expected a JSON list of records, got dict"),
    ([{"id": "r0", "image": "a.png"}], r"record 0 \(id 'r0'\): missing or empty 'conversations'"),
    ([{"conversations": [{"from": "human", "value": "hi"}]}, 5], r"record 1: expected a JSON object, got int"),
    ([{"id": "q", "conversations": [{"from": "robot", "value": "hi"}]}], r"record 0 \(id 'q'\): conversations\[0\] has 'from' = 'robot'"),
    ([{"id": "q", "conversations": [{"from": "human"}]}], r"id 'q'\): conversations\[0\] must be an object with a string 'value'"),
    ([{"id": "m", "image": "missing.png", "conversations": [{"from": "human", "value": "<image>\nx"}]}],
     r"record 0 \(id 'm'\): image file .*missing.png does not exist"),
    ([{"id": "n", "image": 3, "conversations": [{"from": "human", "value": "x"}]}], r"id 'n'\): 'image' must be a path"),
    ([{"id": "t", "image": "ok.png", "conversations": [{"from": "human", "value": "no placeholder"}]}],
     r"id 't'\): 1 image\(s\) but 0 <image> placeholder"),
    ([{"id": "v", "conversations": [{"from": "human", "value": "x"}], "vlmlab": {"task": "vqa"}}],
     r"id 'v'\): malformed 'vlmlab' field: KeyError"),
    ([{"id": "w", "conversations": [{"from": "human", "value": "x"}],
       "vlmlab": {"task": "vqa", "answers": [None], "scenes": [{"width": 5}]}}], r"id 'w'\): 'vlmlab' scenes: not a scene graph"),
])
def test_llava_errors_name_file_and_record(tmp_path, records, message):
    _png(tmp_path / "ok.png")
    path = _write(tmp_path, records)
    with pytest.raises(DataError, match=message) as e:
        read_llava_json(path)
    assert str(path) in str(e.value)


def test_llava_undecodable_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "trunc.png").write_bytes(_png_bytes()[:60])
    path = _write(tmp_path, [
        {"id": "bad", "image": "bad.png", "conversations": [{"from": "human", "value": "<image>\nx"}]},
        {"id": "trunc", "image": "trunc.png", "conversations": [{"from": "human", "value": "<image>\nx"}]},
    ])
    samples = read_llava_json(path)  # lazy: reading does not decode
    for s in samples:
        with pytest.raises(DataError, match=rf"data.json: record \d \(id '{s.id}'\): image file .*{s.id}.png does not decode"):
            s.images
    with pytest.raises(DataError, match=r"record 0 \(id 'bad'\).*does not decode"):
        read_llava_json(path, verify_images=True)
    with pytest.raises(DataError, match="cannot read LLaVA JSON"):
        read_llava_json(tmp_path / "nope.json")


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_pairs_round_trip_and_errors(tmp_path):
    pairs = [image_text_pair(i, "test", CONFIG) for i in range(5)]
    path = write_pairs(pairs, tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and set(json.loads(lines[0])) == {"id", "image", "caption"}
    back = read_pairs(path)
    assert [(p.id, p.caption) for p in back] == [(p.id, p.caption) for p in pairs]
    assert [p.image.tobytes() for p in back] == [p.image.tobytes() for p in pairs]

    _png(tmp_path / "x.png")
    good = '{"image": "x.png", "caption": "grey"}\n'
    cases = {
        good + "{not json\n": r"pairs.jsonl: line 2: not valid JSON",
        good + '["a"]\n': r"line 2: expected a JSON object, got list",
        '{"image": "x.png"}\n': r"line 1: missing or non-string field 'caption'",
        '\n{"id": "k", "image": "gone.png", "caption": "c"}\n': r"line 2 \(id 'k'\): image file .*gone.png does not exist",
    }
    for text, message in cases.items():
        path.write_text(text)
        with pytest.raises(DataError, match=message):
            read_pairs(path)
    (tmp_path / "x.png").write_bytes(b"not an image")
    path.write_text(good)
    (pair,) = read_pairs(path)
    with pytest.raises(DataError, match=r"pair '1': image file .*x.png does not decode"):
        pair.image
    with pytest.raises(DataError, match="cannot open image-caption file"):
        read_pairs(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError):
        ImageTextPair("z", "caption")


def _run(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_data_synth(tmp_path):
    code, out, _ = _run(["data", "synth", "--out", str(tmp_path / "d"), "--n", "12", "--split", "val", "--seed", "3",
                         "--size", "96x64", "--tasks", "count,point:2,multi_image"])
    assert code == 0 and "wrote 12 samples" in out and "data.json" in out
    samples = read_llava_json(tmp_path / "d")
    assert [s.id.split("-")[1] for s in samples] == [f"{k:09d}" for k in range(3, 15)]
    assert {s.answers[0].task for s in samples} <= {"count", "point", "multi_image_more", "multi_image_both",
                                                   "multi_image_which"}
    files = sorted(p.name for p in (tmp_path / "d" / "images").iterdir())
    assert len(files) == sum(s.n_images for s in samples)
    assert all(im.size == (96, 64) for s in samples for im in s.images)
    # the same command gives the same samples as the library
    s0 = samples[0]
    ref = generate_sample(s0.id.split("-", 2)[2], 3, "val", SceneConfig(width=96, height=64))
    assert ref.turns[-1].text == s0.turns[-1].text and ref.images[0].tobytes() == s0.images[0].tobytes()

    code, out, _ = _run(["data", "synth", "--out", str(tmp_path / "p"), "--n", "3", "--format", "pairs",
                         "--preset", "hard", "--size", "64"])
    assert code == 0 and "wrote 3 image-caption pairs" in out
    assert len(read_pairs(tmp_path / "p" / "pairs.jsonl")) == 3


@pytest.mark.parametrize("argv, message", [
    (["--size", "big"], "--size 'big': expected WIDTHxHEIGHT"),
    (["--size", "8x8"], "SceneConfig.width = 8"),
    (["--tasks", "counting"], "unknown task or family 'counting'"),
    (["--n", "0"], "--n 0: expected at least 1"),
    (["--split", "val", "--seed", "9999999"], "outside split 'val'"),
    (["--format", "pairs", "--tasks", "vqa"], "--tasks applies to --format llava"),
])
def test_cli_data_synth_errors(tmp_path, argv, message):
    base = ["data", "synth", "--out", str(tmp_path / "o"), "--n", "2"]
    code, _, err = _run(base + argv)
    assert code == 1 and message in err and "Traceback" not in err

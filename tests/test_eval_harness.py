"""The scenes benchmark harness: reference answerers score what they must, every answer kind is
parsed and scored without raising, dual encoders go through classify / embed, and `vlmlab eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmlab.cli.main import main
from vlmlab.data.scenes import TASKS, classification_sample, class_names, image_text_pair
from vlmlab.data.scenes.tasks import CLASSES, classification_label
from vlmlab.errors import InputError
from vlmlab.eval.harness import Majority, Oracle, evaluate, write_report
from vlmlab.eval.metrics import normalize_answer

N = 3


@pytest.fixture(scope="module")
def oracle_report():
    return evaluate(Oracle(), split="test", n=N)


def test_oracle_scores_every_non_caption_task_perfectly(oracle_report):
    r = oracle_report
    answer_tasks = {p.answer.task for p in r.predictions}
    assert {t for t in TASKS if t not in ("multi_turn", "classify")} <= answer_tasks
    for task, score in r.scores.items():
        if task.startswith("caption"):
            assert score > 1.0, task  # CIDEr-D of one of the references
        else:
            assert score == 1.0, task
    assert r.overall == 1.0
    assert sum(r.counts.values()) == len(r.predictions)


@pytest.mark.parametrize("split", ["train", "compositional"])
def test_oracle_is_perfect_on_other_splits(split):
    r = evaluate(Oracle(), split=split, n=2, tasks=["ground", "point", "count", "multi_turn"])
    assert r.overall == 1.0


class Parrot:
    """Always says the same thing."""

    kind = "parrot"

    def __init__(self, text: str):
        self.text = text

    def ask(self, messages, images=(), **_):
        assert messages and messages[-1]["role"] == "user" and images
        assert messages[0]["content"].count("<image>") == len(images)
        return self.text


@pytest.mark.parametrize("text", ["", "banana", "<point x=", "(1,2),(3", "<points x1=\"5\">", "eleventy"])
def test_garbage_answers_score_zero_and_never_raise(text):
    r = evaluate(Parrot(text), split="val", n=2)
    for task, score in r.scores.items():
        if not task.startswith("caption"):
            assert score == 0.0, (task, text)


def test_majority_scores_the_share_of_its_answer():
    """Independently of the harness: the share of evaluated answers equal to the baseline's."""
    model = Majority(n_train=60)
    r = evaluate(model, split="test", n=8, tasks=["count", "color", "exist", "size", "point", "compare"])
    for task in ("count", "color", "exist", "size", "compare"):
        said = model._majority(task)
        truths = [p.answer.value for p in r.predictions if p.answer.task == task]
        want = np.mean([normalize_answer(said) == normalize_answer(t) for t in truths])
        assert r.scores[task] == pytest.approx(want), task
    none_share = np.mean([p.answer.value == [] for p in r.predictions if p.answer.task == "point"])
    assert r.scores["point"] == pytest.approx(none_share)
    assert r.overall < 0.7


class LookupDualEncoder:
    """A perfect dual encoder for the test: it recognises the benchmark's images by their bytes."""

    kind = "dual-encoder"

    def __init__(self, split: str, n: int, use_classify: bool):
        self.labels = {classification_sample(i, split).images[0].tobytes(): CLASSES[classification_label(
            classification_sample(i, split))] for i in range(n)}
        pairs = [image_text_pair(i, split) for i in range(n)]
        self.captions = [p.caption for p in pairs]
        self.pair_index = {p.image.tobytes(): i for i, p in enumerate(pairs)}
        if not use_classify:
            self.classify = None
        self.calls = []

    def classify(self, images, labels, templates=("{}",)):
        self.calls.append("classify")
        label = {k: v for k, v in self.labels.items()}
        def match(key, lab):  # the full class, or only its shape / colour
            return lab == label[key] or lab in label[key].split()
        return np.array([[1.0 if match(im.tobytes(), lab) else 0.0 for lab in labels] for im in images])

    def _onehot(self, i: int, dim: int = 512) -> np.ndarray:
        v = np.zeros(dim)
        v[i % dim] = 1.0
        return v

    def _word(self, word: str) -> np.ndarray:
        from vlmlab.data.scenes import COLOR_NAMES, SHAPES

        words = list(SHAPES) + list(COLOR_NAMES)
        return self._onehot(460 + words.index(word))

    def embed_image(self, images):
        self.calls.append("embed_image")
        out = []
        for im in images:
            key = im.tobytes()
            if key in self.pair_index:
                out.append(self._onehot(self.pair_index[key]))
            else:  # its class, shape and colour directions together: each prompt kind matches best
                color, shape = self.labels[key].split()
                out.append(self._onehot(400 + CLASSES.index(self.labels[key])) + self._word(shape) + self._word(color))
        return np.stack(out)

    def embed_text(self, texts):
        self.calls.append("embed_text")
        out = []
        for t in texts:
            if t in self.captions:
                out.append(self._onehot(self.captions.index(t)))
            else:  # "a photo of a red circle." / "a photo of a circle." / "a photo of a red object."
                label = t.removeprefix("a photo of a ").removesuffix(".").removesuffix(" object")
                out.append(self._onehot(400 + CLASSES.index(label)) if label in CLASSES else self._word(label))
        return np.stack(out)


@pytest.mark.parametrize("use_classify", [True, False])
def test_dual_encoder_zero_shot_and_retrieval(use_classify):
    model = LookupDualEncoder("val", 12, use_classify)
    r = evaluate(model, split="val", n=12)
    assert r.scores == {"zero_shot": 1.0, "zero_shot_shape": 1.0, "zero_shot_color": 1.0,
                        "retrieval_i2t_R@1": 1.0, "retrieval_t2i_R@1": 1.0}
    assert r.extra["t2i_R@5"] == 1.0
    assert ("classify" in model.calls) == use_classify
    assert set(class_names("val")) <= set(CLASSES)


def test_model_without_the_api_is_named():
    class Blind:
        kind = "language-model"
        name = "blind-lm"

    with pytest.raises(InputError) as e:
        evaluate(Blind(), n=1)
    assert "blind-lm" in str(e.value) and "ask" in str(e.value) and "embed_image" in str(e.value)


def test_bad_split_task_and_n_are_named():
    with pytest.raises(InputError, match="'nope'"):
        evaluate(Oracle(), split="nope", n=1)
    with pytest.raises(InputError, match="'sing'"):
        evaluate(Oracle(), n=1, tasks=["sing"])
    with pytest.raises(InputError, match="at least 1"):
        evaluate(Oracle(), n=0)


def test_report_files(oracle_report, tmp_path):
    json_path, png_path = write_report(oracle_report, tmp_path / "rep")
    data = json.loads(json_path.read_text())
    assert data["overall"] == 1.0 and data["split"] == "test" and data["scores"]["ground"] == 1.0
    assert data["examples"] and all({"id", "task", "prediction", "truth"} <= set(e) for e in data["examples"])
    from PIL import Image

    with Image.open(png_path) as im:
        assert im.width >= 256 and im.height >= 256
        assert len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10  # drawn, not blank


def test_cli_eval_oracle(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--model", "oracle", "--n", "2", "--tasks", "count,ground,point", "--out", str(out),
                 "--chance"]) == 0
    text = capsys.readouterr().out
    assert "overall (mean over non-caption tasks): 1.000" in text
    assert (out / "report.json").is_file() and (out / "examples.png").is_file()
    assert main(["eval", "--model", "majority", "--n", "2", "--tasks", "count", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "majority" and set(report["scores"]) == {"count"}


def test_cli_eval_errors(tmp_path, capsys, tiny_hf_factory):
    folder, _ = tiny_hf_factory("llama", "eval_lm", tokenizer=True)
    capsys.readouterr()
    assert main(["eval", "--model", str(folder), "--n", "1", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "vlmlab: error:" in err and "cannot be scored" in err
    assert main(["eval", "--model", "oracle", "--tasks", "count,sing", "--out", str(tmp_path / "y")]) == 1
    assert "'sing'" in capsys.readouterr().err

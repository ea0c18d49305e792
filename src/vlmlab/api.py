"""`vlmlab.load(name_or_path)`: the one entry point the CLI and server use to get a model.

A name resolves to a local path (`checkpoints.resolve`); the path's format (GGUF file or HF
folder) and its architecture pick the family that builds the network (`ARCHITECTURES`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmlab.checkpoints.gguf import read_gguf
from vlmlab.checkpoints.hf import read_config, read_safetensors
from vlmlab.checkpoints.resolve import resolve
from vlmlab.errors import ConfigError, ModelNotFoundError, UnknownArchitectureError
from vlmlab.hardware import fast_dtype, warn_if_slow_bfloat16
from vlmlab.infer.lm import LanguageModel
from vlmlab.nn.quant import int4_kernel_available
from vlmlab.infer.dual import DualEncoder, TextInputs
from vlmlab.infer.vlm import VisionLanguageModel
from vlmlab.models import clip, idefics3, lit, llava, siglip
from vlmlab.text import llama
from vlmlab.text.locations import add_location_tokens, with_locations
from vlmlab.text.tokenizer import Tokenizer
from vlmlab.vision.preprocess import ImageProcessor

# HF `architectures` value -> family module providing its config and network.
ARCHITECTURES = {name: llama for name in llama.HF_ARCHITECTURES}
DUAL_ARCHITECTURES = {name: family for family in (clip, siglip, lit) for name in family.HF_ARCHITECTURES}
GGUF_ARCHITECTURES = {name: llama for name in llama.GGUF_ARCHITECTURES}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":  # bfloat16 where the CPU multiplies it natively, else float32
        return fast_dtype("cpu")
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)} or auto") from None


def _load_gguf(path: Path, dtype: torch.dtype, int4: bool) -> LanguageModel:
    g = read_gguf(path)
    family = GGUF_ARCHITECTURES.get(g.architecture)
    if family is None:
        raise UnknownArchitectureError(
            f"{path}: GGUF architecture {g.architecture!r} is not supported "
            f"(supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )
    cfg = family.LlamaConfig.from_gguf(g)
    net = family.LlamaForCausalLM.without_weights(cfg)
    net.load_gguf_tensors(g, dtype, int4=int4)
    return LanguageModel(net, Tokenizer.from_gguf(g), name=path.name)


def _load_hf(folder: Path, dtype: torch.dtype, keep_adapter: bool = False, int4: bool = False) -> LanguageModel:
    config = read_config(folder)
    archs = config.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ConfigError(f"{folder / 'config.json'}: 'architectures' must be a list of names, got {archs!r}")
    dual = next((DUAL_ARCHITECTURES[a] for a in archs if a in DUAL_ARCHITECTURES), None)
    if dual is not None:
        return _load_dual(folder, config, dual, dtype)
    if any(a in llava.HF_ARCHITECTURES for a in archs):
        return _load_llava(folder, config, dtype, keep_adapter, int4)
    if any(a in idefics3.HF_ARCHITECTURES for a in archs):
        return _load_idefics3(folder, config, dtype)
    family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
    if family is None:
        supported = sorted({*ARCHITECTURES, *DUAL_ARCHITECTURES, *llava.HF_ARCHITECTURES, *idefics3.HF_ARCHITECTURES})
        raise UnknownArchitectureError(
            f"{folder / 'config.json'}: architecture {', '.join(archs) or '(none given)'} is not supported "
            f"(supported: {', '.join(supported)})"
        )
    cfg = _parse_config(folder, config, family.LlamaConfig)
    tensors, origin = read_safetensors(folder)
    net = family.LlamaForCausalLM.without_weights(cfg)
    net.load_hf_tensors(tensors, origin, dtype)
    return LanguageModel(net, Tokenizer.from_folder(folder), name=folder.name)


def _parse_config(folder: Path, config: dict, config_class):
    """A family config from config.json; its errors name the file."""
    try:
        return config_class.from_hf(config)
    except ConfigError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from None


def _image_processor(folder: Path | None, kind: str, image_size: int) -> ImageProcessor:
    """The folder's preprocessor_config.json, or the `kind` ("clip" / "siglip") default at the
    model's image size."""
    if folder is not None and (folder / "preprocessor_config.json").is_file():
        return ImageProcessor.from_folder(folder)
    return getattr(ImageProcessor, kind)(image_size)


def _load_llava(folder: Path, config: dict, dtype: torch.dtype, keep_adapter: bool = False,
                int4: bool = False) -> VisionLanguageModel:
    """A LLaVA folder: network, tokenizer (with its chat template), image processor.

    A folder of parts (what vlmlab ships: `"vlmlab_language_model": NAME` in config.json) holds
    only the vision tower and projector; the language model comes from NAME (a built-in model,
    GGUF file or folder, which brings the tokenizer) plus the LoRA adapter in `adapter/`, merged
    (`keep_adapter`: kept as LoRA layers; `int4`: the GGUF's 4-bit layers kept in 4 bits, the
    adapter beside them as a low-rank term).
    """
    cfg = _parse_config(folder, config, llava.LlavaConfig)
    tensors, origin = read_safetensors(folder)
    kind = "siglip" if cfg.vision_model_type.startswith("siglip") else "clip"
    processor = _image_processor(folder, kind, cfg.vision.image_size)
    source = config.get(PARTS_FIELD)
    if keep_adapter and not (folder / "adapter").is_dir():  # `load` checked that it is a parts folder
        raise ConfigError(f"{folder}: keep_adapter needs a parts folder with an adapter/ folder")
    if source is None:
        net = llava.LlavaNet(cfg)
        net.load_hf_tensors(tensors, origin, dtype)
        return VisionLanguageModel(net, with_locations(Tokenizer.from_folder(folder), cfg.location_tokens), processor,
                                   name=folder.name)
    lm = load(source, dtype=torch.float32, quantization="int4" if int4 else None)
    if type(lm) is not LanguageModel:
        raise ConfigError(f"{folder / 'config.json'}: {PARTS_FIELD} {source!r} is not a decoder language model")
    with lm.unpacked() as text_net:
        if _architecture(text_net.cfg.to_hf()) != _architecture(cfg.text.to_hf()):
            raise ConfigError(f"{folder / 'config.json'}: text_config does not describe {source!r}")
        net = llava.LlavaNet(cfg, language_model=text_net)
    net.load_hf_tensors(tensors, origin, torch.float32, with_language_model=False)
    if (folder / "adapter").is_dir():
        from vlmlab.checkpoints.peft import load_adapter

        load_adapter(net, folder / "adapter", key_map=llava.PEFT_KEY_MAP, merge=not keep_adapter)
    return VisionLanguageModel(net.to(dtype), with_locations(lm.tokenizer, cfg.location_tokens), processor,
                               name=folder.name)


def _load_idefics3(folder: Path, config: dict, dtype: torch.dtype) -> VisionLanguageModel:
    """An Idefics3 / SmolVLM folder: network, tokenizer (whose "<image>" must be the config's
    image_token_id), tiling image processor."""
    cfg = _parse_config(folder, config, idefics3.Idefics3Config)
    tensors, origin = read_safetensors(folder)
    net = idefics3.Idefics3Net(cfg)
    net.load_hf_tensors(tensors, origin, dtype)
    tokenizer = Tokenizer.from_folder(folder)
    if (token_id := tokenizer.token_to_id(idefics3.IMAGE_TOKEN)) != cfg.image_token_id:
        found = "missing" if token_id is None else f"token {token_id}"
        raise ConfigError(f"{folder}: the tokenizer's {idefics3.IMAGE_TOKEN} is {found}, but config.json's "
                          f"image_token_id is {cfg.image_token_id}")
    processor = idefics3.Idefics3Processor.from_folder(folder, cfg)
    return VisionLanguageModel(net, tokenizer, processor, name=folder.name)


def _architecture(text_config: dict) -> dict:
    """A decoder config without its storage dtype (a vlmlab-saved folder names one; a GGUF does not)."""
    return {k: v for k, v in text_config.items() if k not in ("dtype", "torch_dtype")}


PARTS_FIELD = "vlmlab_language_model"  # config.json of a parts folder: where its language model comes from


def save_parts(model: VisionLanguageModel, folder: str | Path, language_model: str,
               adapter: str | Path | None = None) -> None:
    """Write `model` as parts (see `_load_llava`): config.json naming `language_model`, the
    vision tower + projector tensors, the image processor, and a copy of the PEFT `adapter`
    folder. `model`'s language model must be `language_model` itself, LoRA not merged in."""
    import shutil

    from vlmlab.checkpoints.hf import write_json, write_safetensors

    folder = Path(folder)
    with model.unpacked() as net:
        tensors = {k: v for k, v in net.hf_state_dict().items()
                   if not k.startswith("language_model.") or k == llava.ADDED_EMBEDDINGS}
        if any(".lora_" in k for k in tensors):
            raise ConfigError("save_parts: LoRA adapters outside the language model cannot be saved as parts")
        cfg = {**net.cfg.to_hf(), PARTS_FIELD: language_model, "dtype": "float32"}
    write_safetensors(folder / "model.safetensors", tensors)
    write_json(folder / "config.json", cfg)
    model.processor.to_folder(folder)
    if adapter is not None:
        shutil.copytree(adapter, folder / "adapter", dirs_exist_ok=True)


def _load_dual(folder: Path, config: dict, family, dtype: torch.dtype) -> DualEncoder:
    """A CLIP / SigLIP / LiT folder: network, image processor, tokenizer."""
    cfg = _parse_config(folder, config, family.Net.Config)
    tensors, origin = read_safetensors(folder)
    net = family.Net(cfg)
    net.load_hf_tensors(tensors, origin, dtype)
    return dual_encoder(net, family, folder)


def dual_encoder(net, family, folder: Path | None = None, name: str | None = None) -> DualEncoder:
    """Wrap a dual-encoder network with its image processor (the folder's preprocessor_config.json,
    or the family's default at the model's image size) and text inputs (the folder's tokenizer, or
    the locked text tower's own)."""
    cfg = net.cfg
    processor = _image_processor(folder, family.PROCESSOR, cfg.vision.image_size)
    if hasattr(net, "text_tokenizer"):  # a locked pretrained text tower brings its own (LiT)
        tokenizer, max_length = net.text_tokenizer()
    else:
        tokenizer, max_length = Tokenizer.from_folder(folder), cfg.text.max_position_embeddings
    text = TextInputs(tokenizer, max_length, pad_to_max_length=family.PAD_TO_MAX_LENGTH,
                      attention_mask=not family.PAD_TO_MAX_LENGTH)
    return DualEncoder(net, text, processor, name=name or (folder.name if folder else "model"), source=folder)


QUANTIZATIONS = ("none", "int4")


def assemble(vision: str | Path, language_model: str | Path, *, projector: str = "mlp2x_gelu",
             image_token: str = "<image>", vision_feature_layer: int | list[int] = -2,
             vision_feature_select_strategy: str = "default", pixel_shuffle: int = 1, feature_norm: bool = False,
             image_positions: bool = False, mrope_sections: list[int] | None = None,
             mrope_interleaved: bool = False, location_tokens: int = 0, dtype: str | torch.dtype | None = None,
             seed: int = 0) -> VisionLanguageModel:
    """A LLaVA from parts: the ViT of a dual encoder (built-in name or CLIP / SigLIP / LiT folder),
    a decoder language model (name, GGUF file or HF folder) with its tokenizer and chat template,
    and a new, randomly initialised projector (train it: projector alignment). `image_token` is
    an existing special token of the tokenizer that stands for one image feature (its embedding
    is never read: features overwrite it). `pixel_shuffle` = s folds s x s patch features into one
    token (s**2 fewer image tokens). `feature_norm` standardises the projector's input per channel
    (identity until `net.calibrate_feature_norm(pixel_values)` measures it on sample images).
    `image_positions` adds a learned row + column embedding to each image token (zeros until trained).
    `mrope_sections` (temporal, height, width; summing to half the decoder's head dim) gives the
    decoder M-RoPE: image tokens rotated by their row and column, text exactly as before
    (`mrope_interleaved`: Qwen3-VL's frequency layout instead of Qwen2-VL's). `location_tokens` = n
    writes boxes as n location tokens, one per coordinate (`text.locations.add_location_tokens`).
    `save()` writes one HF LLaVA folder."""
    dual, lm = load(vision, dtype=dtype), load(language_model, dtype=dtype)
    if not isinstance(dual, DualEncoder):
        raise ConfigError(f"assemble: vision {str(vision)!r} is not a dual encoder (CLIP, SigLIP, LiT)")
    if type(lm) is not LanguageModel:
        raise ConfigError(f"assemble: language_model {str(language_model)!r} is not a decoder language model")
    token_id = lm.tokenizer.token_to_id(image_token)
    if token_id is None:
        raise ConfigError(f"assemble: {image_token!r} is not a token of {lm.name}'s tokenizer; pick one of its "
                          "special tokens that the model never needs to read")
    tower = dual.net.vision_model
    kind = "clip_vision_model" if tower.cfg.class_token else "siglip_vision_model"
    defaults, switches = llava.VISION_FAMILIES[kind]
    vision_cfg = llava.ViTConfig.from_hf(tower.cfg.to_hf(), **switches)
    with lm.unpacked() as text_net:
        cfg = llava.LlavaConfig(vision_cfg, text_net.cfg, vision_model_type=kind, projector=projector,
                                vision_feature_layer=vision_feature_layer,
                                vision_feature_select_strategy=vision_feature_select_strategy,
                                image_token_id=token_id, pixel_shuffle=pixel_shuffle, feature_norm=feature_norm,
                                image_positions=image_positions, mrope_sections=mrope_sections,
                                mrope_interleaved=mrope_interleaved)
        torch.manual_seed(seed)
        net = llava.LlavaNet(cfg, language_model=text_net)
    missing = net.vision_tower.load_state_dict(tower.state_dict(), strict=False)
    if missing.missing_keys:  # the LLaVA tower has no pooling head; the dual encoder's may
        raise ConfigError(f"assemble: the vision tower lacks {missing.missing_keys[:3]}")
    net.to(next(text_net.parameters()).dtype)
    name = f"{Path(str(vision)).name}+{Path(str(language_model)).name}"
    model = VisionLanguageModel(net, lm.tokenizer, dual.processor, name=name)
    if location_tokens:
        add_location_tokens(model, location_tokens)
    return model


def load(
    name_or_path: str | Path, *, dtype: str | torch.dtype | None = None, quantization: str | None = None,
    keep_adapter: bool = False,
) -> LanguageModel | VisionLanguageModel | DualEncoder:
    """Load a model by built-in name (`smollm2`), HF folder or .gguf file, fully offline.

    quantization="int4" keeps a GGUF's 4-bit (Q4_0/Q4_1) layer weights in 4 bits and multiplies
    with an int4 kernel: about a quarter of the weight traffic of bfloat16 when decoding. It
    applies to a .gguf file and to a parts folder whose language model is one (`scenes-smol`).
    keep_adapter=True keeps a parts folder's LoRA adapter as LoRA layers (to train it further, as
    `[model] keep_adapter` of a recipe does) instead of merging it into the language model.
    """
    path = resolve(str(name_or_path))
    torch_dtype = parse_dtype(dtype)
    warn_if_slow_bfloat16(torch_dtype, "cpu", what=str(name_or_path))
    quantization = quantization or "none"
    if quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantization!r} is not supported; choose one of {', '.join(QUANTIZATIONS)}")
    int4 = quantization == "int4"
    if int4 and not int4_kernel_available():
        raise ConfigError("quantization 'int4' needs PyTorch's CPU int4 kernel, which this PyTorch build lacks")
    if keep_adapter and (path.is_file() or PARTS_FIELD not in read_config(path)):
        raise ConfigError(f"{path}: keep_adapter needs a LLaVA parts folder ({PARTS_FIELD} in config.json) with "
                          "an adapter/ folder")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFoundError(f"{path}: a model file must be .gguf (or pass an HF folder)")
        return _load_gguf(path, torch_dtype, int4)
    if int4 and PARTS_FIELD not in read_config(path):
        raise ConfigError(f"{path}: quantization 'int4' reads 4-bit GGUF tensors; this is a dense HF folder "
                          "(a vlmlab parts folder whose language model is a GGUF file can be loaded in int4)")
    if int4 and keep_adapter:
        raise ConfigError(f"{path}: keep_adapter and quantization 'int4' exclude each other: a trainable adapter "
                          "needs the dense language model")
    return _load_hf(path, torch_dtype, keep_adapter, int4)

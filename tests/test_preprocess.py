"""vlmlab.vision.preprocess against transformers' PIL image processors (CLIP, SigLIP): real photographs,
awkward image modes, EXIF orientation, bad files and limits, preprocessor_config.json round trips."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmlab.errors import ConfigError, ImageError, InputError
from vlmlab.vision import ImageProcessor, load_image
from vlmlab.vision.preprocess import center_crop, to_rgb

ATOL = 1e-6
PHOTOS = ("astronaut", "coffee", "chelsea", "camera")  # bundled in the scikit-image wheel, no download

# Published preprocessor_config.json files (openai/clip-vit-base-patch32 in its old feature-extractor
# form, openai/clip-vit-large-patch14-336, google/siglip-base-patch16-224, siglip-so400m-patch14-384).
CLIP_B32 = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3, "size": 224,
}
CLIP_L336 = {
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "processor_class": "CLIPProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
}
SIGLIP_224 = {
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
    "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}
SIGLIP_384 = {**SIGLIP_224, "size": {"height": 384, "width": 384}}


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def hf():
    """The reference: transformers' PIL-backed (slow) processors and its load_image."""
    transformers = pytest.importorskip("transformers")
    from transformers.image_utils import load_image as hf_load_image

    class Ref:
        load_image = staticmethod(hf_load_image)

        @staticmethod
        def processor(config: dict):
            kind = config.get("image_processor_type") or config.get("feature_extractor_type")
            cls = transformers.SiglipImageProcessorPil if "Siglip" in kind else transformers.CLIPImageProcessorPil
            return cls.from_dict(config)

        @staticmethod
        def run(config: dict, images) -> torch.Tensor:
            return Ref.processor(config)(images, return_tensors="pt")["pixel_values"]

    return Ref


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    """The scikit-image sample photographs, each as PNG and as JPEG."""
    data = pytest.importorskip("skimage.data")
    folder = tmp_path_factory.mktemp("photos")
    files = []
    for name in PHOTOS:
        im = Image.fromarray(getattr(data, name)())
        for ext in ("png", "jpg"):
            path = folder / f"{name}.{ext}"
            im.save(path, quality=90) if ext == "jpg" else im.save(path)
            files.append(path)
    return files


def _photo(name: str) -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return getattr(data, name)()


def assert_same(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape, (ours.shape, ref.shape)
    assert (ours - ref).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------------------
# Real photographs vs transformers


PARITY_CONFIGS = {
    "clip-224": CLIP_B32,
    "clip-336": CLIP_L336,
    "siglip-224": SIGLIP_224,
    "siglip-384": SIGLIP_384,
    "siglip-nonsquare": {**SIGLIP_224, "size": {"height": 200, "width": 320}},
    "clip-nonsquare-crop": {**CLIP_L336, "size": {"shortest_edge": 256}, "crop_size": {"height": 192, "width": 240}},
    # crop larger than the resized image on one side: transformers zero-pads, then crops
    "clip-padded-crop": {**CLIP_L336, "size": {"shortest_edge": 200}, "crop_size": {"height": 224, "width": 256}},
    "clip-bilinear-unnormalised": {**CLIP_L336, "resample": 2, "do_normalize": False},
}


@pytest.mark.parametrize("config_name", sorted(PARITY_CONFIGS))
def test_photographs_match_transformers(config_name, photo_files, hf):
    config = PARITY_CONFIGS[config_name]
    ours = ImageProcessor.from_hf(config)(photo_files)  # the whole batch at once, from paths
    ref = hf.run(config, [hf.load_image(str(p)) for p in photo_files])
    assert ours.shape[0] == len(photo_files)
    assert_same(ours, ref)


def test_pil_inputs_match_transformers(hf):
    images = [Image.fromarray(_photo(name)) for name in PHOTOS]
    for config in (CLIP_B32, SIGLIP_224):
        assert_same(ImageProcessor.from_hf(config)(images), hf.run(config, images))


def test_resize_size_truncates_like_transformers():
    # chelsea is 300x451: 224 * 451 / 300 = 336.7 -> 336 (int), not 337 (round)
    p = ImageProcessor.clip()
    assert p.resize_size(300, 451) == (224, 336)
    assert p.resize_size(451, 300) == (336, 224)
    assert p.resize_size(224, 500) == (224, 500)
    assert ImageProcessor.siglip(384).resize_size(300, 451) == (384, 384)


def test_center_crop_offsets_and_padding():
    a = np.arange(5 * 7).reshape(5, 7, 1)
    # floor offsets: top (5-2)//2 = 1, left (7-3)//2 = 2
    assert center_crop(a, 2, 3)[..., 0].tolist() == [[9, 10, 11], [16, 17, 18]]
    padded = center_crop(a, 8, 7)[..., 0]  # 3 rows of padding: 2 on top (ceil), 1 below
    assert padded.shape == (8, 7)
    assert padded[:2].sum() == 0 and padded[-1].sum() == 0 and padded[2].tolist() == list(range(7))


# ---------------------------------------------------------------------------------------------
# Awkward files vs transformers


def _awkward_files(folder: Path) -> dict[str, Path]:
    chelsea = Image.fromarray(_photo("chelsea"))  # 451x300, so there is a real resize and crop
    camera = _photo("camera")[::2, ::3]  # greyscale 256x171
    files: dict[str, Path] = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        files[name] = folder / name
        im.save(files[name], **kw)

    save("palette.png", chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64))
    p = chelsea.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save("palette-transparent.png", p, transparency=int(np.asarray(p)[150, 200]))  # a common colour
    rgba = chelsea.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(chelsea.size))
    save("rgba.png", rgba)
    la = Image.fromarray(camera).convert("LA")
    la.putalpha(Image.linear_gradient("L").rotate(90).resize(la.size))
    save("la.png", la)
    save("cmyk.jpg", chelsea.convert("CMYK"), quality=95)
    save("grey16.png", Image.fromarray(camera.astype(np.uint16) * 3))  # I;16, values up to 765
    save("grey16b.tif", Image.frombytes("I;16B", camera.shape[::-1], (camera.astype(">u2") * 2).tobytes()))
    save("int32.tif", Image.fromarray(camera.astype(np.int32) * 2 - 100))
    save("float.tif", Image.fromarray(camera.astype(np.float32) * 1.3 - 20.5))
    save("grey.jpg", Image.fromarray(camera))
    save("bilevel.png", Image.fromarray(camera > 128))
    return files


AWKWARD_MODES = {
    "palette.png": "P", "palette-transparent.png": "P", "rgba.png": "RGBA", "la.png": "LA",
    "cmyk.jpg": "CMYK", "grey16.png": "I;16", "grey16b.tif": "I;16B", "int32.tif": "I",
    "float.tif": "F", "grey.jpg": "L", "bilevel.png": "1",
}


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> dict[str, Path]:
    return _awkward_files(tmp_path_factory.mktemp("awkward"))


@pytest.mark.parametrize("name", sorted(AWKWARD_MODES))
def test_awkward_mode_matches_transformers(name, awkward, hf):
    path = awkward[name]
    with Image.open(path) as im:
        assert im.mode == AWKWARD_MODES[name]  # the file really has the awkward mode
    # load_image: the same RGB pixels as transformers.image_utils.load_image
    ours_rgb = load_image(path)
    ref_rgb = hf.load_image(str(path))
    assert ours_rgb.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(ours_rgb), np.asarray(ref_rgb))
    for config in (CLIP_B32, SIGLIP_224):
        # a path, as a user hands a file to the transformers processor (it calls load_image)
        assert_same(ImageProcessor.from_hf(config)(path), hf.run(config, [ref_rgb]))
        # a PIL image as opened, which the processor converts itself (alpha onto white, no EXIF)
        with Image.open(path) as a, Image.open(path) as b:
            assert_same(ImageProcessor.from_hf(config)(a), hf.run(config, [b]))


@pytest.mark.parametrize("mode", ["PA", "I;16B", "I", "F", "LA", "1"])
def test_in_memory_modes_match_transformers(mode, hf):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (90, 130)).astype(np.uint8)
    if mode == "PA":
        im = Image.fromarray(grey).convert("P")  # PNG cannot store PA, so only in memory
        im.putpalette(rng.integers(0, 256, 768).astype(np.uint8).tobytes())
        im = im.convert("PA")
        im.putalpha(Image.fromarray(rng.integers(0, 256, (90, 130)).astype(np.uint8)))
    elif mode == "I;16B":
        im = Image.frombytes("I;16B", (130, 90), (grey.astype(">u2") * 3).tobytes())
    elif mode == "I":
        im = Image.fromarray(grey.astype(np.int32) * 2 - 200)
    elif mode == "F":
        im = Image.fromarray(grey.astype(np.float32) * 1.7 - 50.25)
    elif mode == "LA":
        im = Image.merge("LA", [Image.fromarray(grey), Image.fromarray(grey[::-1].copy())])
    else:
        im = Image.fromarray(grey > 100)
    assert im.mode == mode
    np.testing.assert_array_equal(np.asarray(load_image(im)), np.asarray(hf.load_image(im)))
    for config in (CLIP_L336, SIGLIP_224):
        assert_same(ImageProcessor.from_hf(config)(im), hf.run(config, [im]))


def test_what_each_mode_becomes(awkward):
    """The conversions transformers makes, spelled out (so a Pillow change shows up here)."""
    chelsea = np.asarray(Image.fromarray(_photo("chelsea")))
    camera = _photo("camera")[::2, ::3]
    # alpha: load_image drops it (the colour under a transparent pixel stays) ...
    with Image.open(awkward["rgba.png"]) as im:
        rgba = np.asarray(im)
        composite = np.asarray(to_rgb(im)).astype(int)
    np.testing.assert_array_equal(np.asarray(load_image(awkward["rgba.png"])), rgba[..., :3])
    # ... while a PIL image handed to the processor is composited onto white
    a = rgba[..., 3:].astype(int)
    assert np.abs(composite - (rgba[..., :3] * a + 255 * (255 - a)) / 255).max() <= 1
    assert rgba[..., 3].min() == 0 and (composite[rgba[..., 3] == 0] == 255).all()
    # 16-bit / 32-bit / float greyscale: clipped to 0..255, not scaled
    grey16 = np.asarray(load_image(awkward["grey16.png"]))
    np.testing.assert_array_equal(grey16[..., 0], np.minimum(camera.astype(int) * 3, 255))
    as_float = np.asarray(load_image(awkward["float.tif"]))[..., 0]
    np.testing.assert_array_equal(as_float, np.clip(camera * np.float32(1.3) - np.float32(20.5), 0, 255).astype(int))
    # bilevel: 0 / 255
    assert set(np.unique(np.asarray(load_image(awkward["bilevel.png"])))) == {0, 255}
    # palette with a transparent index: load_image keeps the colour and remembers it in info;
    # the processor then turns every pixel of that colour white
    rgb = load_image(awkward["palette-transparent.png"])
    key = rgb.info["transparency"]
    keyed = (np.asarray(rgb) == key).all(-1)
    assert keyed.any()
    whitened = np.asarray(to_rgb(rgb))
    assert (whitened[keyed] == 255).all() and (whitened[~keyed] == np.asarray(rgb)[~keyed]).all()
    assert chelsea.shape == np.asarray(rgb).shape


@pytest.mark.parametrize("orientation, marker_corner", [(6, "top-right"), (3, "bottom-right"), (1, "top-left")])
def test_exif_orientation_applied_like_transformers(orientation, marker_corner, tmp_path, hf):
    stored = np.zeros((80, 120, 3), np.uint8)  # 120 wide, 80 tall, blue with a red top-left block
    stored[..., 2] = 200
    stored[:24, :24] = (230, 10, 10)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"rotated{orientation}.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    upright = np.asarray(load_image(path))
    assert upright.shape == ((120, 80, 3) if orientation == 6 else (80, 120, 3))
    h, w = upright.shape[:2]
    corners = {
        "top-left": upright[4:20, 4:20], "top-right": upright[4:20, w - 20 : w - 4],
        "bottom-right": upright[h - 20 : h - 4, w - 20 : w - 4],
    }
    assert corners[marker_corner][..., 0].mean() > 180 and corners[marker_corner][..., 2].mean() < 60
    np.testing.assert_array_equal(upright, np.asarray(hf.load_image(str(path))))

    config = {**CLIP_L336, "size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 96}}
    ours = ImageProcessor.from_hf(config)(path)
    assert_same(ours, hf.run(config, [hf.load_image(str(path))]))
    if orientation != 1:  # the rotation changed what the model sees
        with Image.open(path) as raw:
            assert (ours - ImageProcessor.from_hf(config)(raw)).abs().max() > 0.5


# ---------------------------------------------------------------------------------------------
# Sources and bad input


def _png_header_only(width: int, height: int) -> bytes:
    """A small PNG whose (valid, CRC-checked) header claims width x height RGB pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_sources_path_bytes_file_pil(tmp_path):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    data = path.read_bytes()
    with Image.open(path) as opened:
        for source in (path, str(path), data, bytearray(data), io.BytesIO(data), opened):
            np.testing.assert_array_equal(np.asarray(load_image(source)), pixels)
    with open(path, "rb") as fh:
        out = ImageProcessor.siglip()([fh, data, Image.fromarray(pixels)])
    assert out.shape == (3, 3, 224, 224) and (out[0] == out[1]).all() and (out[0] == out[2]).all()


def _error(source, **kw) -> str:
    with pytest.raises(ImageError) as info:
        load_image(source, **kw)
    return str(info.value)


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is a text file, not a PNG\n")
    msg = _error(path)
    assert str(path) in msg and "not an image" in msg
    assert "image bytes" in _error(b"GIF89a-not-really") and "not an image" in _error(b"GIF89a-not-really")


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_file(ext, tmp_path):
    path = tmp_path / f"cut.{ext}"
    buf = io.BytesIO()
    noise = np.random.default_rng(2).integers(0, 256, (200, 300, 3)).astype(np.uint8)
    Image.fromarray(noise).save(buf, "JPEG" if ext == "jpg" else "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    msg = _error(path)
    assert str(path) in msg and "truncated or corrupt" in msg
    with pytest.raises(ImageError, match="truncated or corrupt"):
        ImageProcessor.clip()([path])
    with Image.open(path) as lazy:  # opened fine (header only); the pixels fail to decode later
        with pytest.raises(ImageError, match="image: truncated or corrupt"):
            ImageProcessor.clip()(lazy)
        with pytest.raises(ImageError, match="image: truncated or corrupt"):
            load_image(lazy)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    msg = _error(path)
    assert str(path) in msg and "empty" in msg
    assert "image bytes: empty" in _error(b"")


def test_too_many_pixels_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header_only(20000, 20000))  # 400 megapixels claimed in a ~100-byte file
    assert path.stat().st_size < 200
    # Pillow's own bomb check (2 x Image.MAX_IMAGE_PIXELS) fires inside Image.open: still an ImageError
    for limit in (1_000_000, None):
        msg = _error(path) if limit is None else _error(path, max_pixels=limit)
        assert str(path) in msg and "too many pixels" in msg and "400000000 pixels" in msg and "max_pixels" in msg
    # under Pillow's limit: refused by our check of the header size
    path.write_bytes(_png_header_only(3000, 2000))
    msg = _error(path, max_pixels=1_000_000)
    assert str(path) in msg and "too many pixels: 3000x2000 = 6,000,000" in msg and "1,000,000 (max_pixels)" in msg
    path.write_bytes(_png_header_only(10000, 7000))  # over the 64 MP default
    assert "10000x7000 = 70,000,000, more than the limit of 64,000,000" in _error(path)
    assert "image bytes" in _error(_png_header_only(300, 300), max_pixels=1000)


def test_too_many_bytes(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(path)
    size = path.stat().st_size
    msg = _error(path, max_bytes=size - 1)
    assert str(path) in msg and f"{size:,} bytes" in msg and "max_bytes" in msg
    load_image(path, max_bytes=size)  # exactly at the limit is fine
    assert "image bytes" in _error(path.read_bytes(), max_bytes=100)
    assert "max_bytes" in _error(io.BytesIO(path.read_bytes()), max_bytes=100)


def test_missing_file_and_directory(tmp_path):
    missing = tmp_path / "nope.jpg"
    msg = _error(missing)
    assert str(missing) in msg and "no such image file" in msg
    assert "not a file" in _error(tmp_path)
    with pytest.raises(ImageError, match="nope.jpg"):
        ImageProcessor.clip()(str(missing))


def test_bad_call_arguments():
    with pytest.raises(InputError, match="no images"):
        ImageProcessor.clip()([])
    with pytest.raises(InputError, match="got int"):
        load_image(42)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="got int"):
        ImageProcessor.clip()(42)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="binary mode"):
        load_image(io.StringIO("text"))  # type: ignore[arg-type]
    no_crop = ImageProcessor(size={"shortest_edge": 32}, do_center_crop=False)
    with pytest.raises(InputError, match="different sizes"):
        no_crop([Image.new("RGB", (40, 40)), Image.new("RGB", (80, 40))])
    assert no_crop([Image.new("RGB", (80, 40))]).shape == (1, 3, 32, 64)
    keep_mode = ImageProcessor(do_convert_rgb=False)
    with pytest.raises(ImageError, match="mode 'L'"):
        keep_mode(Image.new("L", (40, 40)))


# ---------------------------------------------------------------------------------------------
# preprocessor_config.json


@pytest.mark.parametrize("config", [CLIP_B32, CLIP_L336, SIGLIP_224, SIGLIP_384], ids=["b32", "l336", "s224", "s384"])
def test_from_hf_to_hf_round_trip(config, tmp_path, hf):
    p = ImageProcessor.from_hf(config)
    assert ImageProcessor.from_hf(p.to_hf()) == p
    p.to_folder(tmp_path)
    assert ImageProcessor.from_folder(tmp_path) == p
    written = json.loads((tmp_path / "preprocessor_config.json").read_text())
    # transformers reads what we write as the same processor
    ref = hf.processor(written)
    assert type(ref).__name__ == ("SiglipImageProcessorPil" if "Siglip" in str(config) else "CLIPImageProcessorPil")
    assert dict(ref.size) == p.size and tuple(ref.image_mean) == p.image_mean and ref.resample == p.resample
    assert bool(ref.do_center_crop) == p.do_center_crop


def test_from_hf_reads_the_family_forms():
    b32 = ImageProcessor.from_hf(CLIP_B32)
    assert b32.family == "clip" and b32.size == {"shortest_edge": 224}
    assert b32.crop_size == {"height": 224, "width": 224} and b32.do_center_crop and b32.do_convert_rgb
    assert b32.rescale_factor == 1 / 255
    s384 = ImageProcessor.from_hf(SIGLIP_384)
    assert s384 == ImageProcessor.siglip(384)
    assert not s384.do_center_crop and s384.image_mean == (0.5, 0.5, 0.5) and s384.size == {"height": 384, "width": 384}
    # missing fields take the family's defaults; a SigLIP int size means the shortest edge, as in transformers
    bare = ImageProcessor.from_hf({"image_processor_type": "SiglipImageProcessorFast", "size": 256})
    assert bare.size == {"shortest_edge": 256} and bare.image_std == (0.5, 0.5, 0.5) and not bare.do_center_crop
    listed = ImageProcessor.from_hf({"size": [200, 300], "crop_size": [100, 120]})
    assert listed.size == {"height": 200, "width": 300} and listed.crop_size == {"height": 100, "width": 120}
    assert ImageProcessor.from_hf({**CLIP_L336, "image_mean": 0.5}).image_mean == (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("size", {"shortest_edge": -224}, "'size.shortest_edge' must be a positive integer, got -224"),
        ("size", -3, "'size' must be a positive integer"),
        ("size", {"longest_edge": 224}, "'size' must have the keys"),
        ("size", "224", "'size' must be an integer, [height, width] or a dict"),
        ("crop_size", {"shortest_edge": 224}, "'crop_size' must have the keys {'height', 'width'}"),
        ("crop_size", [224, 0], "'crop_size[1]' must be a positive integer"),
        ("resample", 99, "'resample' must be a PIL filter number"),
        ("resample", "bicubic", "'resample' must be a PIL filter number"),
        ("do_center_crop", "yes", "'do_center_crop' must be true or false"),
        ("rescale_factor", 0, "'rescale_factor' must be a positive number"),
        ("image_mean", [0.5, 0.5], "'image_mean' must be a number or a list of 3 numbers"),
        ("image_std", [0.5, 0.0, 0.5], "'image_std' must hold positive finite numbers"),
        ("image_processor_type", "LlavaNextImageProcessor", "'LlavaNextImageProcessor' is not supported"),
    ],
)
def test_bad_field_is_config_error(field, value, expected, tmp_path):
    config = {**CLIP_L336, field: value}
    with pytest.raises(ConfigError) as info:
        ImageProcessor.from_hf(config)
    assert expected in str(info.value) and "preprocessor_config.json" in str(info.value)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=str(tmp_path)):
        ImageProcessor.from_folder(tmp_path)


def test_from_folder_missing_or_malformed(tmp_path):
    with pytest.raises(ConfigError, match="preprocessor_config.json not found"):
        ImageProcessor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ImageProcessor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ImageProcessor.from_folder(tmp_path)

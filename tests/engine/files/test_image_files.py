"""engine/image_files.py: exact PNG pixels at every setting, ComfyUI's metadata in every format, clear errors."""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from zimage_turbo.engine.files import image_files as f
from zimage_turbo.engine.files.image_files import ImageFileError

PROMPT = {"3": {"class_type": "ZImageTurboSampler", "inputs": {"prompt": "孙珍妮,旗袍,上海外滩", "seed": 42}}}
WORKFLOW = {"nodes": [{"id": 3, "type": "ZImageTurboSampler"}], "links": [], "version": 0.4}
TEXT = f.comfy_metadata(PROMPT, {"workflow": WORKFLOW})


def photo(height=96, width=128, channels=3, seed=0, grain=2.0) -> np.ndarray:
    """Smooth gradients and a soft disc plus film grain: photo-like, so run-length coding wins."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width, 1) * 200, y / max(height, 1) * 180, (x + y) / max(width + height, 1) * 150], -1)
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 3) ** 2
    base[disc] += 40
    img = base[..., :channels] if channels <= 3 else np.concatenate([base, base[..., :1]], -1)
    img = img + rng.normal(0, grain, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def flat(height=96, width=128) -> np.ndarray:
    """Large even areas: deflate wins over run-length coding."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2] = (30, 90, 200)
    img[height // 2:] = (40, 120, 40)
    img[:, ::16] = 255
    return img


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, body) of every PNG chunk, each CRC checked."""
    assert data[:8] == f.PNG_SIGNATURE
    out, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(kind + body), f"bad CRC in {kind}"
        out.append((kind, body))
        at += 12 + length
    assert out[-1] == (b"IEND", b"")
    return out


# ---------------------------------------------------------------------------------------------- PNG pixels

IMAGES = {
    "photo": photo(),
    "flat": flat(),
    "noise": np.random.default_rng(3).integers(0, 256, (64, 80, 3), dtype=np.uint8),
    "grey 2-d": photo(channels=1)[..., 0],
    "grey": photo(channels=1),
    "rgba": photo(channels=4),
    "one pixel": np.array([[[1, 2, 3]]], np.uint8),
    "one row": photo(1, 300),
    "one column": photo(300, 1),
    "many bands": photo(1500, 40),  # narrow: about 1000 rows a band, so two bands
    "wide": photo(20, 9000),  # a row beyond the band size: a band per row
}


@pytest.mark.parametrize("compression", f.PNG_COMPRESSION)
@pytest.mark.parametrize("name", list(IMAGES))
def test_png_decodes_to_exactly_the_input_pixels(name, compression):
    image = IMAGES[name]
    for threads in (1, 3):
        data = f.encode_png(image, TEXT, compression=compression, threads=threads)
        assert np.array_equal(decode(data), image.reshape(image.shape[:2]) if image.size == image.shape[0] * image.shape[1] else image)


@pytest.mark.parametrize("compression", f.PNG_COMPRESSION)
def test_png_is_one_valid_zlib_stream_and_the_same_bytes_on_any_number_of_cores(compression):
    image = photo(700, 300)
    data = f.encode_png(image, TEXT, compression=compression, threads=1)
    assert f.encode_png(image, TEXT, compression=compression, threads=4) == data
    found = chunks(data)
    idat = [body for kind, body in found if kind == b"IDAT"]
    assert len(idat) > 2  # several bands, then the Adler-32
    # zlib checks the header and the combined Adler-32; the result is the filtered rows.
    raw = zlib.decompress(b"".join(idat))
    assert len(raw) == 700 * (300 * 3 + 1)
    assert [kind for kind, _ in found][:2] == [b"IHDR", b"tEXt"]  # text before the image data, as Pillow writes it


def test_png_bands_choose_run_length_or_deflate_by_content():
    """Grainy bands are run-length coded, smooth ones deflated: never larger than Pillow's level 4 (SaveImage)."""
    grainy, smooth = photo(400, 400, grain=2.5), photo(400, 400, grain=0)
    for image in (grainy, smooth):
        pillow = io.BytesIO()
        Image.fromarray(image).save(pillow, "PNG", compress_level=4)
        assert len(f.encode_png(image)) <= len(pillow.getvalue())
    # Smooth content: deflate beats run-length coding alone (png_fast) by far.
    assert len(f.encode_png(smooth)) < 0.5 * len(f.encode_png(smooth, compression="fast"))
    # Even areas come down to almost nothing either way.
    assert max(len(f.encode_png(flat(400, 400), compression=c)) for c in f.PNG_COMPRESSION) < 0.01 * 400 * 400 * 3


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_adler32_of_joined_bands_equals_zlibs(first, second):
    combined = f._adler32_combine(zlib.adler32(first), zlib.adler32(second), len(second))
    assert combined == zlib.adler32(first + second)


def test_adler32_combine_on_large_bands():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (70_000, 1, 200_003, 65521 * 3)]
    adler = 1
    for part in parts:
        adler = f._adler32_combine(adler, zlib.adler32(part), len(part))
    assert adler == zlib.adler32(b"".join(parts))


# ---------------------------------------------------------------------------------------------- ComfyUI's images

def test_float_images_become_the_pixels_comfyuis_saveimage_writes():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.random((2, 20, 30, 3), dtype=np.float32) * 1.2 - 0.1)  # beyond 0..1 too
    images[0, 0, 0] = torch.tensor([0.999, 1 / 255, 254.5 / 255])
    got = f.to_uint8(images)
    # SaveImage: i = 255. * image.cpu().numpy(); np.clip(i, 0, 255).astype(np.uint8)
    want = np.stack([np.clip(255.0 * im.numpy(), 0, 255).astype(np.uint8) for im in images])
    assert got.dtype == np.uint8 and got.shape == (2, 20, 30, 3)
    assert np.array_equal(got, want)
    data = f.encode_png(images[1], TEXT)
    assert np.array_equal(decode(data), want[1])


def test_nan_becomes_black_and_half_precision_tensors_are_accepted():
    image = torch.full((4, 5, 3), 0.5, dtype=torch.bfloat16)
    image[0, 0, 0] = float("nan")
    got = f.to_uint8(image)
    assert got[0, 0, 0, 0] == 0 and got[0, 1, 1, 0] == 127


def test_comfy_metadata_is_what_saveimage_writes():
    extra = {"workflow": WORKFLOW, "other": [1, 2]}
    text = f.comfy_metadata(PROMPT, extra)
    assert list(text) == ["prompt", "workflow", "other"]
    assert text["prompt"] == json.dumps(PROMPT) and text["workflow"] == json.dumps(WORKFLOW)
    assert text["prompt"].isascii()  # json.dumps escapes Chinese: every reader gets the same text
    assert f.comfy_metadata(None, None) == {}


# ---------------------------------------------------------------------------------------------- metadata per format

def test_png_metadata_is_tEXt_and_equal_for_pillow_and_our_reader():
    data = f.encode_png(photo(), TEXT)
    with Image.open(io.BytesIO(data)) as im:
        assert im.text == TEXT
    assert f.read_metadata(data) == TEXT
    assert json.loads(f.read_metadata(data)["prompt"]) == PROMPT


def test_png_text_beyond_latin1_is_iTXt():
    text = {"prompt": "一只猫", "note": "café"}
    data = f.encode_png(photo(), text)
    kinds = {body.split(b"\0")[0]: kind for kind, body in chunks(data) if kind in (b"tEXt", b"iTXt")}
    assert kinds == {b"prompt": b"iTXt", b"note": b"tEXt"}
    with Image.open(io.BytesIO(data)) as im:
        assert im.text == text
    assert f.read_metadata(data) == text


def front_end_webp_metadata(data: bytes) -> dict:
    """ComfyUI front end 1.32's getWebpMetadata, step for step (chunk walk without pad bytes, IFD0 only)."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    at, out = 12, {}
    while at < len(data):
        (size,) = struct.unpack("<I", data[at + 4:at + 8])
        if data[at:at + 4] == b"EXIF":
            if data[at + 8:at + 14] == b"Exif\0\0":
                at += 6
            exif = data[at + 8:at + 8 + size]
            order = "<" if exif[:2] == b"II" else ">"
            (ifd,) = struct.unpack(order + "I", exif[4:8])
            (count,) = struct.unpack(order + "H", exif[ifd:ifd + 2])
            for n in range(count):
                _tag, kind, length, offset = struct.unpack(order + "HHII", exif[ifd + 2 + 12 * n:ifd + 14 + 12 * n])
                if kind == 2:
                    value = exif[offset:offset + length - 1].decode("utf-8")
                    key, _, rest = value.partition(":")
                    out[key] = rest
            break
        at += 8 + size
    return out


@pytest.mark.parametrize("lossless", [False, True])
def test_webp_metadata_is_read_by_comfyuis_front_end_and_pillow(lossless):
    rng = np.random.default_rng(11)
    odd = 0
    for n in range(24):  # sizes and qualities that give odd-sized image chunks now and then
        height, width = (int(v) for v in rng.integers(8, 120, 2))
        channels = 4 if n % 3 == 0 else 3
        image = photo(height, width, channels, seed=n)
        quality = int(rng.integers(1, 101))
        data = f.encode_webp(image, TEXT, quality=quality, lossless=lossless)
        assert front_end_webp_metadata(data) == TEXT
        assert f.read_metadata(data) == TEXT
        with Image.open(io.BytesIO(data)) as im:
            assert im.getexif()[0x0110] == "prompt:" + TEXT["prompt"]  # ComfyUI's tags: Model
            assert im.getexif()[0x010F] == "workflow:" + TEXT["workflow"]  # and Make
        if lossless:
            assert np.array_equal(decode(data), image)
        # The image chunk made even decodes exactly as libwebp's own output.
        buf = io.BytesIO()
        f._pillow_image(image).save(buf, "WEBP", quality=quality, lossless=lossless, method=2,
                                    exif=f.exif_bytes(TEXT), exact=True)
        odd += buf.getvalue() != data
        assert np.array_equal(decode(buf.getvalue()), decode(data))
    assert odd > 0  # the fix was needed for some of them


def test_jpeg_metadata_in_exif_and_too_large_fields_are_left_out_with_a_warning(caplog):
    image = photo()
    data = f.encode_jpeg(image, TEXT, quality=95)
    assert f.read_metadata(data) == TEXT
    assert np.abs(decode(data).astype(int) - image).mean() < 4
    big = {"prompt": json.dumps(PROMPT), "workflow": json.dumps({"nodes": ["x" * 70_000]})}
    with caplog.at_level(logging.WARNING, logger="zimage_turbo"):
        data = f.encode_jpeg(image, big)
    assert f.read_metadata(data) == {"prompt": big["prompt"]}
    assert "metadata workflow not written" in caplog.text


def test_exif_holds_utf8_and_counts_down_from_make_like_comfyui():
    text = {"workflow": "{}", "prompt": '"猫"', "third": "x"}
    entries = dict(f._exif_entries(text))
    assert entries == {0x0110: 'prompt:"猫"\0'.encode(), 0x010F: b"workflow:{}\0", 0x010E: b"third:x\0"}
    assert f.read_metadata(f.encode_webp(photo(), text)) == text


# ---------------------------------------------------------------------------------------------- files and formats

@pytest.mark.parametrize("fmt", list(f.FORMATS))
def test_every_format_writes_a_readable_file_with_its_metadata(tmp_path, fmt):
    image = photo(64, 48)
    data = f.encode(image, fmt, TEXT, quality=80)
    path = f.write_file(tmp_path / f"x{f.FORMATS[fmt][0]}", data)
    assert path.read_bytes() == data and [p.name for p in tmp_path.iterdir()] == [path.name]
    with Image.open(path) as im:
        assert im.size == (48, 64) and im.format == {"png": "PNG", "png_fast": "PNG", "webp": "WEBP",
                                                     "jpeg": "JPEG"}[fmt]
    assert f.read_metadata(data) == TEXT
    if fmt.startswith("png"):
        assert np.array_equal(decode(data), image)


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(f.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        f.write_file(tmp_path / "a.png", b"data")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("images,message", [
    (np.zeros((4, 4, 2), np.uint8), "shape (4, 4, 2)"),
    (np.zeros((1, 1, 4, 4, 3), np.uint8), "shape (1, 1, 4, 4, 3)"),
    (np.zeros((0, 4, 3), np.uint8), "no empty dimension"),
    (np.zeros((4,), np.uint8), "shape (4,)"),
    (np.zeros((4, 4, 3), np.int32), "dtype int32"),
    (np.zeros((4, 4, 3), bool), "dtype bool"),
    (np.zeros((2, 4, 4, 3), np.uint8), "one image per file: got a batch of 2"),
])
def test_bad_images_are_refused_with_the_reason(images, message):
    for encode in (f.encode_png, f.encode_webp, f.encode_jpeg):
        with pytest.raises(ImageFileError, match=message.replace("(", r"\(").replace(")", r"\)")):
            encode(images)


def test_bad_settings_are_refused_with_the_reason():
    image = photo(8, 8)
    cases = [
        (lambda: f.encode(image, "gif"), "unknown image format 'gif'"),
        (lambda: f.encode_png(image, compression="max"), "PNG compression 'max'"),
        (lambda: f.encode_webp(image, quality=0), "quality 0"),
        (lambda: f.encode_jpeg(image, quality=101), "quality 101"),
        (lambda: f.encode_jpeg(image, quality=True), "quality True"),
        (lambda: f.encode_jpeg(photo(8, 8, 4)), "JPEG has no alpha channel"),
        (lambda: f.encode_webp(np.zeros((1, 16384, 3), np.uint8)), "WebP holds at most 16383"),
        (lambda: f.encode_png(image, {"": "x"}), "metadata key ''"),
        (lambda: f.encode_png(image, {"k" * 80: "x"}), "1 to 79 Latin-1"),
        (lambda: f.encode_png(image, {"猫": "x"}), "metadata key '猫'"),
        (lambda: f.encode_png(image, {"k": "a\0b"}), "NUL"),
        (lambda: f.encode_webp(image, {"a:b": "x"}), "holds a colon"),
        (lambda: f.encode_webp(image, {f"k{i}": "x" for i in range(18)}), "too many metadata fields"),
    ]
    for call, message in cases:
        with pytest.raises(ImageFileError, match=message):
            call()

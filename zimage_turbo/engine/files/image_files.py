"""Image files with ComfyUI's workflow metadata: PNG (lossless, fast, on all cores), WebP and JPEG.

Why a PNG writer of our own: ComfyUI's SaveImage (Pillow, compress level 4) spends 130-280 ms on
one 1024x1024 image, on one core, while the GPU waits. Measured on photo-like images
(bench/encode_bench.py, results in bench/results/encode/):

* Pillow's deflate at level 4 spends its time looking for repeated strings in grain, where there
  are none. After PNG's "Average" filter, zlib's run-length strategy (Z_RLE: runs of the previous
  byte, then Huffman coding) writes *smaller* files (-5 %) in a fifth of the time on one core.
  On clean content (flat shading, even areas) deflate's search does find strings: each band's
  first 8 KiB are compressed both ways to choose (see _compress_band).
* zlib releases the GIL, and so do numpy's filters: the image is cut into bands of rows that are
  filtered and compressed in threads (1.6-2x on 2 cores, measured), then stitched into one
  valid zlib stream as pigz does: every band but the last ends with a sync flush (a byte-aligned,
  non-final empty block), a deflated band's compressor is primed with the 32 KiB before it (so it
  may refer back, as one stream would), each band is its own IDAT chunk (its CRC computed in its
  thread), and the Adler-32 checksums of the bands are combined arithmetically.

The bands have a fixed height for a given width, so the same image gives the same bytes on a
machine with 2 cores or 64. Every file decodes to exactly the input pixels (the tests decode
with Pillow and zlib).

Metadata is written the way ComfyUI writes it and its front end reads it back (so a file dropped
on the canvas loads its workflow): PNG: one tEXt chunk per key ("prompt", "workflow", ...) holding
JSON; WebP and JPEG: EXIF, IFD0, ASCII entries "key:json": the prompt in tag 0x0110 (Model), other
keys from 0x010F (Make) downwards. ComfyUI's front end reads PNG and WebP files; it does not read
workflows from JPEG files (the metadata is still there for other tools).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path

import numpy as np

from ..errors import ZImageError

log = logging.getLogger("zimage_turbo")


class ImageFileError(ZImageError):
    """The image or its metadata cannot be written as asked; the message says why."""


# ---------------------------------------------------------------------------------------------- pixels

CHANNELS = {1: "L", 3: "RGB", 4: "RGBA"}
CONVERT_BAND_VALUES = 1 << 18  # float values converted per task


def to_uint8(images, threads: int | None = None) -> np.ndarray:
    """Images as uint8 [batch, height, width, channels] (1, 3 or 4 channels).

    Accepts numpy arrays or torch tensors of shape [H, W], [H, W, C] or [B, H, W, C]. uint8 is
    taken as is; floats are ComfyUI's IMAGE (0..1) and are converted exactly as ComfyUI's
    SaveImage converts them (float32, times 255, clipped, truncated), so the files hold the same
    pixels SaveImage would write; NaN becomes 0. Large images are converted in row bands on
    `threads` threads (None: every core).
    """
    if hasattr(images, "detach"):  # a torch tensor, without importing torch here
        tensor = images.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()  # bf16/fp16 have no numpy twin
        images = tensor.numpy()
    arr = np.asarray(images)
    shape = tuple(arr.shape)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in CHANNELS or 0 in arr.shape:
        raise ImageFileError(
            f"cannot save an image of shape {shape}: expected [height, width], [height, width, channels] or "
            "[batch, height, width, channels] with 1, 3 or 4 channels and no empty dimension")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        out = np.empty(arr.shape, np.uint8)
        rows_in, rows_out = arr.reshape(-1, arr.shape[-2] * arr.shape[-1]), out.reshape(-1, out.shape[-2] * out.shape[-1])

        def convert(lo, hi):
            scaled = np.clip(255.0 * rows_in[lo:hi].astype(np.float32, copy=False), 0, 255)
            np.nan_to_num(scaled, copy=False, nan=0.0)
            np.copyto(rows_out[lo:hi], scaled, casting="unsafe")  # truncates, as astype(np.uint8)

        step = max(1, CONVERT_BAND_VALUES // rows_in.shape[1])
        bands = [(lo, min(lo + step, len(rows_in))) for lo in range(0, len(rows_in), step)]
        _map(convert, bands, cpu_count() if threads is None else threads)
        return out
    raise ImageFileError(f"cannot save an image of dtype {arr.dtype}: expected uint8 (0..255) or floats (0..1)")


def _one_image(pixels) -> np.ndarray:
    arr = to_uint8(pixels)
    if arr.shape[0] != 1:
        raise ImageFileError(f"one image per file: got a batch of {arr.shape[0]} (save each image on its own)")
    return arr[0]


# ---------------------------------------------------------------------------------------------- metadata

def comfy_metadata(prompt=None, extra_pnginfo=None) -> dict[str, str]:
    """The text fields ComfyUI's SaveImage writes: "prompt" (the API graph) then each extra_pnginfo key
    (the front end sends "workflow"), each as JSON (ASCII: json.dumps escapes other characters)."""
    text = {}
    if prompt is not None:
        text["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        text[str(key)] = json.dumps(value)
    return text


def _check_key(key: str) -> bytes:
    try:
        raw = key.encode("latin-1")
    except UnicodeEncodeError:
        raw = b""
    if not 1 <= len(raw) <= 79 or b"\0" in raw:
        raise ImageFileError(f"metadata key {key!r} cannot be written: keys are 1 to 79 Latin-1 characters, no NUL")
    return raw


def _text_chunk(key: str, value: str) -> bytes:
    raw_key = _check_key(key)
    if "\0" in value:
        raise ImageFileError(f"metadata {key!r} holds a NUL character, which PNG text cannot hold")
    try:
        # tEXt, as Pillow writes ComfyUI's JSON; the only text chunk ComfyUI's front end reads correctly.
        return _chunk(b"tEXt", raw_key + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # iTXt for text beyond Latin-1: uncompressed, no language tag, UTF-8.
        return _chunk(b"iTXt", raw_key + b"\0\0\0\0\0" + value.encode("utf-8"))


FIRST_EXIF_TAG = 0x010F  # Make; ComfyUI counts down from here for extra_pnginfo keys
PROMPT_EXIF_TAG = 0x0110  # Model
LAST_EXIF_TAG = 0x0100


def _exif_entries(text: dict[str, str]) -> list[tuple[int, bytes]]:
    entries, tag = [], FIRST_EXIF_TAG
    for key, value in text.items():
        _check_key(key)
        if ":" in key:  # readers split "key:value" at the first colon
            raise ImageFileError(f"metadata key {key!r} cannot be written to EXIF: it holds a colon")
        if key == "prompt":
            number = PROMPT_EXIF_TAG
        else:
            if tag < LAST_EXIF_TAG:
                raise ImageFileError(f"too many metadata fields for EXIF ({len(text)}): at most 17")
            number, tag = tag, tag - 1
        entries.append((number, f"{key}:{value}".encode() + b"\0"))
    return sorted(entries)


def exif_bytes(text: dict[str, str]) -> bytes:
    """An EXIF block ("Exif\\0\\0" + little-endian TIFF, one IFD) with each field as ComfyUI writes it:
    an ASCII entry "key:value", the prompt in tag 0x0110 and other keys from 0x010F down."""
    entries = _exif_entries(text)
    ifd_size = 2 + 12 * len(entries) + 4
    data_at = 8 + ifd_size
    ifd, data = [struct.pack("<H", len(entries))], []
    for tag, value in entries:
        if len(value) <= 4:
            ifd.append(struct.pack("<HHI", tag, 2, len(value)) + value.ljust(4, b"\0"))
        else:
            ifd.append(struct.pack("<HHII", tag, 2, len(value), data_at))
            data.append(value)
            data_at += len(value)
            if data_at % 2:  # TIFF values start on word boundaries
                data.append(b"\0")
                data_at += 1
    ifd.append(struct.pack("<I", 0))
    return b"Exif\0\0" + b"II*\0" + struct.pack("<I", 8) + b"".join(ifd) + b"".join(data)


def _fitting_exif(text: dict[str, str], limit: int, fmt: str) -> bytes:
    """EXIF within `limit` bytes: fields are kept in order while they fit; the rest are named in a warning."""
    kept: dict[str, str] = {}
    dropped = []
    for key, value in text.items():
        trial = {**kept, key: value}
        if len(exif_bytes(trial)) <= limit:
            kept = trial
        else:
            dropped.append(key)
    if dropped:
        log.warning("%s holds at most %d bytes of EXIF: metadata %s not written (save as PNG or WebP to keep it)",
                    fmt, limit, ", ".join(dropped))
    return exif_bytes(kept) if kept else b""


def read_metadata(data: bytes) -> dict[str, str]:
    """The text fields of a PNG, WebP or JPEG file written by this module or by ComfyUI."""
    if data[:8] == PNG_SIGNATURE:
        return _read_png_text(data)
    from PIL import Image

    with Image.open(BytesIO(data)) as im:
        exif = im.info.get("exif") or b""
    return _read_exif_text(exif[6:] if exif.startswith(b"Exif\0\0") else exif)


def _read_exif_text(tiff: bytes) -> dict[str, str]:
    """The "key:value" ASCII entries of IFD0 in the tags ComfyUI uses (UTF-8, as its front end decodes them)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return {}
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd:ifd + 2])
    out = {}
    for n in range(count):
        tag, kind, length, offset = struct.unpack(order + "HHII", tiff[ifd + 2 + 12 * n:ifd + 14 + 12 * n])
        if kind != 2 or not LAST_EXIF_TAG <= tag <= PROMPT_EXIF_TAG:
            continue
        raw = tiff[ifd + 10 + 12 * n:ifd + 10 + 12 * n + length] if length <= 4 else tiff[offset:offset + length]
        key, sep, value = raw.rstrip(b"\0").decode("utf-8", "replace").partition(":")
        if sep:
            out[key] = value
    return out


def _read_png_text(data: bytes) -> dict[str, str]:
    out, at = {}, 8
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        body = data[at + 8:at + 8 + length]
        if kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            out[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            if rest[:1] == b"\0":  # uncompressed
                _lang, _, rest = rest[2:].partition(b"\0")
                _translated, _, value = rest.partition(b"\0")
                out[key.decode("latin-1")] = value.decode("utf-8")
        elif kind == b"IEND":
            break
        at += 12 + length
    return out


# ---------------------------------------------------------------------------------------------- PNG

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type (grey, RGB, RGBA), 8 bits each
PNG_COMPRESSION = ("default", "fast")
BAND_BYTES = 1 << 17  # rows per band: about 128 KiB of image data (fixed per width: same bytes on any machine)
WINDOW = 1 << 15  # deflate's window: a band's compressor is primed with this much of the data before it
SAMPLE_BYTES = 1 << 13  # the start of each band, compressed first to choose how to compress the band
DEFLATE_WORTH_TRYING = 0.40  # run-length coded below this ratio, the sample may hold repeated strings
DEFLATE_GAIN = 0.93  # deflate must beat run-length coding by 7 % on the sample to be run on the whole band
DEFLATE_LEVEL = 4  # SaveImage's level
ADLER_BASE = 65521

FILTER_UP, FILTER_AVERAGE = 2, 3  # PNG filter types (0 none, 1 sub, 2 up, 3 average, 4 paeth)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _adler32_combine(first: int, second: int, second_len: int) -> int:
    """Adler-32 of A+B from those of A and B (B of `second_len` bytes): A's running sum carries into each
    of B's positions (zlib has this as adler32_combine; Python's zlib does not expose it)."""
    a1, b1 = first & 0xFFFF, first >> 16
    a2, b2 = second & 0xFFFF, second >> 16
    a = (a1 + a2 - 1) % ADLER_BASE
    b = (b1 + b2 + second_len * (a1 - 1)) % ADLER_BASE
    return (b << 16) | a


def _filter_rows(flat: np.ndarray, r0: int, r1: int, channels: int, kind: int) -> np.ndarray:
    """PNG-filtered rows r0..r1 of `flat` ([height, width*channels] uint8): [rows, 1 + width*channels]."""
    cur = flat[r0:r1]
    if r0 > 0:
        above = flat[r0 - 1:r1 - 1]
    else:
        above = np.empty_like(cur)
        above[0] = 0
        above[1:] = flat[0:r1 - 1]
    out = np.empty((r1 - r0, flat.shape[1] + 1), np.uint8)
    out[:, 0] = kind
    body = out[:, 1:]
    if kind == FILTER_UP:
        np.subtract(cur, above, out=body)
    else:  # average of the left and upper neighbours, floor((a + b) / 2) computed without overflow
        left, up = cur[:, :-channels], above[:, channels:]
        mean = np.bitwise_and(left, up)
        mean += np.right_shift(np.bitwise_xor(left, up), 1)
        np.subtract(cur[:, channels:], mean, out=body[:, channels:])
        np.subtract(cur[:, :channels], np.right_shift(above[:, :channels], 1), out=body[:, :channels])
    return out


def _deflate(raw: memoryview, level: int, strategy: int, zdict: bytes | None, last: bool) -> bytes:
    args = (level, zlib.DEFLATED, -15, 9, strategy)
    comp = zlib.compressobj(*args, zdict=zdict) if zdict else zlib.compressobj(*args)
    return comp.compress(raw) + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _compress_band(filtered: np.ndarray, before, last: bool, fast: bool, header: bytes) -> tuple:
    """One band as a whole IDAT chunk (CRC computed here, in the band's thread), and the band's Adler-32.
    `before()` gives the data before the band, for a deflated band to refer back to.

    Run-length coding, unless the band's first bytes show that deflate's search for repeated strings
    pays: they must run-length code below DEFLATE_WORTH_TRYING of their size (smooth content; grain
    never gets there) and deflate must beat that by DEFLATE_GAIN. Deciding on a sample keeps each
    band to one full compression; measured, within 2 % of the smaller of the two on every band.
    """
    raw = memoryview(filtered).cast("B")
    level, strategy, window = 1, zlib.Z_RLE, None  # runs look back one byte: no use for the window before
    if not fast:
        sample = raw[:SAMPLE_BYTES]
        runs = len(_deflate(sample, 1, zlib.Z_RLE, None, False))
        if runs < DEFLATE_WORTH_TRYING * len(sample):
            searched = len(_deflate(sample, DEFLATE_LEVEL, zlib.Z_DEFAULT_STRATEGY, None, False))
            if searched < DEFLATE_GAIN * runs:
                level, strategy, window = DEFLATE_LEVEL, zlib.Z_DEFAULT_STRATEGY, before()
    out = _deflate(raw, level, strategy, window, last)
    return _chunk(b"IDAT", header + out), zlib.adler32(raw), len(raw)


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="zimage-image-files")
        return _pool


def _map(fn, items: list, threads: int) -> list:
    """[fn(*item) for item in items] on up to `threads` threads, the caller's one of them. Items are handed
    out one at a time as threads come free (bands differ in cost: deflated ones take longer)."""
    if threads <= 1 or len(items) <= 1:
        return [fn(*item) for item in items]
    results = [None] * len(items)
    order = itertools.count()  # next() on it is atomic under the GIL

    def work():
        for i in iter(lambda: next(order), None):
            if i >= len(items):
                return
            results[i] = fn(*items[i])

    helpers = [_executor().submit(work) for _ in range(min(threads, len(items)) - 1)]
    try:
        work()
    finally:
        for helper in helpers:
            helper.result()  # waits for all; raises the first helper's error
    return results


def encode_png(pixels, text: dict[str, str] | None = None, *, compression: str = "default",
               threads: int | None = None) -> bytes:
    """A PNG of one image ([H, W], [H, W, C] or [1, H, W, C]; uint8, or floats 0..1) with tEXt metadata.

    compression "default": Average filter, each band run-length coded or deflated, whichever is
    smaller (smaller than Pillow's level 4 on photo-like images); "fast": Up filter and run-length
    coding only. threads: None uses every core this process may run on; 1 runs in the caller's thread.
    """
    if compression not in PNG_COMPRESSION:
        raise ImageFileError(f"PNG compression {compression!r}: expected one of {', '.join(PNG_COMPRESSION)}")
    image = _one_image(pixels)
    height, width, channels = image.shape
    if width >= 2**31 or height >= 2**31:
        raise ImageFileError(f"a PNG holds at most 2^31-1 pixels a side, not {width}x{height}")
    fast = compression == "fast"
    kind = FILTER_UP if fast else FILTER_AVERAGE
    flat = image.reshape(height, width * channels)
    stride = width * channels + 1
    rows = max(1, BAND_BYTES // stride)
    bands = [(r, min(height, r + rows)) for r in range(0, height, rows)]
    threads = cpu_count() if threads is None else max(1, int(threads))

    header = b"\x78\x01" if fast else b"\x78\x9c"  # zlib: deflate, 32 KiB window; level hint; check bits
    before_rows = -(-WINDOW // stride)

    def band(r0, r1):  # filter and compress rows r0..r1
        def before():  # the 32 KiB of filtered data before the band, for deflate to refer back to
            if r0 == 0:
                return None
            previous = _filter_rows(flat, max(0, r0 - before_rows), r0, channels, kind)
            return bytes(memoryview(previous).cast("B")[-WINDOW:])

        return _compress_band(_filter_rows(flat, r0, r1, channels, kind), before, r1 == height, fast,
                              header if r0 == 0 else b"")

    compressed = _map(band, bands, threads)

    adler = 1
    for _, band_adler, band_len in compressed:
        adler = _adler32_combine(adler, band_adler, band_len)
    parts = [PNG_SIGNATURE,
             _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, COLOR_TYPES[channels], 0, 0, 0))]
    parts += [_text_chunk(k, v) for k, v in (text or {}).items()]
    parts += [chunk for chunk, _, _ in compressed]
    parts.append(_chunk(b"IDAT", struct.pack(">I", adler)))
    parts.append(_chunk(b"IEND", b""))
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------- WebP, JPEG

WEBP_MAX_SIDE = 16383
# libwebp's effort for the "webp" format: 0 is its fastest. Measured on the 1024x1024 photo of
# bench/encode_bench.py at quality 90, one core, without metadata: effort 0 -> 41 ms, 89 KB; 2 -> 61 ms,
# 69 KB; 4 -> 132 ms, 66 KB, all at 40.5-40.8 dB PSNR: effort buys size, not quality, and the WebP is
# 15-20x smaller than the PNG already.
WEBP_METHOD = 0
JPEG_MAX_SIDE = 65500
JPEG_EXIF_LIMIT = 65533 - 2  # one APP1 segment; Pillow adds nothing beyond these bytes


def _pillow_image(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image, CHANNELS[image.shape[-1]])


def _check_quality(quality) -> int:
    if isinstance(quality, bool) or not isinstance(quality, (int, np.integer)) or not 1 <= quality <= 100:
        raise ImageFileError(f"quality {quality!r}: expected a whole number from 1 to 100")
    return int(quality)


def encode_webp(pixels, text: dict[str, str] | None = None, *, quality: int = 90, lossless: bool = False,
                method: int = 2) -> bytes:
    """A WebP of one image with the metadata in EXIF as ComfyUI writes it (its front end reads it back).

    method is libwebp's effort, 0 (fastest) to 6; lossless keeps the pixels exactly.
    """
    quality = _check_quality(quality)
    image = _one_image(pixels)
    height, width = image.shape[:2]
    if width > WEBP_MAX_SIDE or height > WEBP_MAX_SIDE:
        raise ImageFileError(f"WebP holds at most {WEBP_MAX_SIDE} pixels a side, not {width}x{height}: save as PNG")
    buf = BytesIO()
    exif = exif_bytes(text) if text else b""
    _pillow_image(image).save(buf, "WEBP", quality=quality, lossless=lossless, method=method, exif=exif, exact=True)
    return _even_image_chunks(buf.getvalue())


BITSTREAM_CHUNKS = (b"VP8 ", b"VP8L", b"ALPH")


def _even_image_chunks(data: bytes) -> bytes:
    """The same WebP with every image chunk of even size.

    ComfyUI's front end (1.32) walks the RIFF chunks to find EXIF but forgets the pad byte that follows
    a chunk of odd size, so it misses the metadata behind an odd-sized image chunk: measured, about half
    of lossless files and of lossy files with alpha (libwebp pads lossy RGB data itself); ComfyUI's own
    animated-WebP node has the same problem. The pad byte is zero and
    already in the file: counting it as the bitstream's last byte makes the chunk even without moving
    anything. Decoders read their bitstream's own lengths and ignore the extra byte (the tests check that
    the pixels decode unchanged).
    """
    out = bytearray(data)
    at = 12
    while at + 8 <= len(out):
        kind, size = bytes(out[at:at + 4]), struct.unpack("<I", out[at + 4:at + 8])[0]
        if size % 2 and kind in BITSTREAM_CHUNKS and at + 8 + size < len(out) and out[at + 8 + size] == 0:
            size += 1
            out[at + 4:at + 8] = struct.pack("<I", size)
        at += 8 + size + size % 2
    return bytes(out)


def encode_jpeg(pixels, text: dict[str, str] | None = None, *, quality: int = 90) -> bytes:
    """A JPEG of one image (no alpha) with the metadata in EXIF as ComfyUI writes it for WebP.

    A JPEG holds at most 64 KiB of EXIF: fields that do not fit (a very large workflow) are left out and
    named in a warning. ComfyUI's front end does not load workflows from JPEG files.
    """
    quality = _check_quality(quality)
    image = _one_image(pixels)
    height, width, channels = image.shape
    if channels == 4:
        raise ImageFileError("JPEG has no alpha channel: save RGBA images as PNG or WebP")
    if width > JPEG_MAX_SIDE or height > JPEG_MAX_SIDE:
        raise ImageFileError(f"JPEG holds at most {JPEG_MAX_SIDE} pixels a side, not {width}x{height}: save as PNG")
    buf = BytesIO()
    exif = _fitting_exif(text, JPEG_EXIF_LIMIT, "JPEG") if text else b""
    _pillow_image(image).save(buf, "JPEG", quality=quality, exif=exif)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- files

# name -> (extension, what it is); the save node offers these names.
FORMATS = {
    "png": (".png", "lossless PNG, files smaller than ComfyUI's SaveImage, on all cores"),
    "png_fast": (".png", "lossless PNG, run-length coding only: fastest, files a little larger"),
    "webp": (".webp", "lossy WebP at the given quality (libwebp's fastest effort): smallest files"),
    "jpeg": (".jpg", "lossy JPEG at the given quality: fastest to write; ComfyUI cannot load its workflow back"),
}


def encode(pixels, fmt: str, text: dict[str, str] | None = None, quality: int = 90,
           threads: int | None = None) -> bytes:
    """One image as a file of `fmt` (a FORMATS name)."""
    if fmt == "png":
        return encode_png(pixels, text, compression="default", threads=threads)
    if fmt == "png_fast":
        return encode_png(pixels, text, compression="fast", threads=threads)
    if fmt == "webp":
        return encode_webp(pixels, text, quality=quality, method=WEBP_METHOD)
    if fmt == "jpeg":
        return encode_jpeg(pixels, text, quality=quality)
    raise ImageFileError(f"unknown image format {fmt!r}: expected one of {', '.join(FORMATS)}")


def write_file(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` whole: into a hidden file beside it, then renamed over it, so a reader never
    sees a partial image (the file is complete when this returns)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path

"""How long saving one image takes: each format and level of engine/image_files.py against ComfyUI's SaveImage.

The images are rendered here, 1024x1024 by default, and are not noise (noise is the one thing no PNG
compresses): a "photo" (sky gradient, sun glow, clouds, hills, a shaded face-like figure with hair strands,
foliage texture, lens blur, then film grain of sigma 2 as in photographs and photo-like generations), the
same scene as an "illustration" (no grain: flat shading compresses far better), and "noise" as the worst
case. The metadata is a real workflow of this package (workflows/Z-Image Turbo - Sugar face LoRA.json and its API twin), as
the front end sends it.

For each image: PNG default / fast on one core and on all cores, WebP and JPEG at a few qualities and
efforts, Pillow's PNG at compress level 4 (what SaveImage does) and ComfyUI 0.3.75's SaveImage itself
(float tensor in, file out) beside this package's node path (to_uint8 + encode + write_file), with file
sizes. Each figure is the median and the minimum of --repeats runs after one warm-up (on a shared machine
the minimum is the better estimate of the cost).

    .venv/bin/python -m bench.encode_bench                    # writes bench/results/encode/<date>-<cpu>.{md,json}
    .venv/bin/python -m bench.encode_bench --size 512 --repeats 3 --out /tmp/enc
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from scripts.comfy_client import COMFY_DIR
from zimage_turbo.engine.files import image_files

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------- images

def _upscaled_noise(rng, size, cells):
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC))


def scene(size=1024, seed=0, grain=2.0) -> np.ndarray:
    """A plausible outdoor portrait: smooth gradients, soft shapes and mild texture; grain 0 = an illustration."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.empty((size, size, 3), np.float32)
    t = np.clip(y / 0.6, 0, 1)[..., None]
    img[:] = np.array([40, 90, 170], np.float32) * (1 - t) + np.array([250, 190, 140], np.float32) * t
    sun = np.sqrt((x - 0.7) ** 2 + (y - 0.35) ** 2)
    img += (np.exp(-(sun / 0.08) ** 2) * 120)[..., None] * np.array([1, 0.85, 0.5], np.float32)
    img[sun < 0.04] = (255, 245, 220)
    clouds = np.clip(_upscaled_noise(rng, size, 24), 0, None) * (y < 0.5)
    img += (clouds * 22)[..., None]
    for k, (base, amp, colour) in enumerate([(0.55, 0.05, (70, 110, 70)), (0.65, 0.06, (50, 90, 45)),
                                             (0.78, 0.04, (90, 80, 50))]):
        ridge = base + amp * np.sin(x * (6 + 3 * k) + k) + 0.02 * np.sin(x * 37 + k * 2)
        below = y > ridge
        shade = (1.0 - 0.4 * (y - ridge))[..., None]
        img[below] = (np.array(colour, np.float32) * shade)[below]
    img += (_upscaled_noise(rng, size, size // 4) * 12 * (y > 0.7))[..., None]  # foliage
    d = ((x - 0.33) / 0.12) ** 2 + ((y - 0.6) / 0.17) ** 2
    face = d < 1
    shading = (1.05 - 0.35 * np.clip(d, 0, 1) - 0.2 * (x - 0.33))[..., None]
    img[face] = (np.array([225, 180, 150], np.float32) * shading)[face]
    hair = ((d < 1.25) & (d >= 1)) | ((d < 1.2) & (y < 0.5))
    strands = 20 * np.sin(x * 900 + 30 * np.sin(y * 20))
    img[hair] = (np.array([60, 40, 30], np.float32) + strands[..., None])[hair]
    blurred = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2))
    img = np.asarray(blurred).astype(np.float32)
    if grain:
        img += rng.normal(0, grain, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def images(size: int) -> dict[str, np.ndarray]:
    return {
        "photo": scene(size, grain=2.0),
        "illustration": scene(size, grain=0),
        "noise": np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8),
    }


def metadata() -> tuple[dict, dict]:
    ui = json.loads((REPO / "workflows" / "Z-Image Turbo - Sugar face LoRA.json").read_text(encoding="utf-8"))
    api = json.loads((REPO / "workflows" / "api" / "zimage_sugar.json").read_text(encoding="utf-8"))
    return api, {"workflow": ui}


# ---------------------------------------------------------------------------------------------- timing

def timed(fn, repeats: int) -> tuple[dict, object]:
    result = fn()  # warm-up (and the output whose size is reported)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return {"median_ms": round(statistics.median(seconds) * 1000, 2), "min_ms": round(min(seconds) * 1000, 2)}, result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_slug(name: str, cores: int) -> str:
    words = re.sub(r"\(r\)|\(tm\)|cpu|processor|@", " ", name.lower())
    return "-".join(re.findall(r"[a-z0-9.]+", words))[:40].strip("-") + f"-{cores}cores"


def comfy_saveimage():
    """ComfyUI's own SaveImage class, or None where ComfyUI is not set up."""
    if not (COMFY_DIR / "nodes.py").is_file():
        return None
    from bench.comfy_inprocess import put_comfyui_on_path

    put_comfyui_on_path(COMFY_DIR)
    try:
        import comfy.cli_args
        import torch

        if not torch.cuda.is_available():
            comfy.cli_args.args.cpu = True  # ComfyUI's model manager refuses to start without a GPU otherwise
        import nodes as comfy_nodes  # ComfyUI's nodes.py

        return comfy_nodes.SaveImage
    except (ImportError, RuntimeError, OSError) as exc:  # ComfyUI's imports failed: say so, go on without it
        print(f"ComfyUI's SaveImage not available ({exc!r}); timing Pillow with its settings only")
        return None


def run(size: int, repeats: int) -> dict:
    import torch

    cores = image_files.cpu_count()
    prompt, extra = metadata()
    text = image_files.comfy_metadata(prompt, extra)
    save_image = comfy_saveimage()
    results = {"size": size, "cores": cores, "cpu": cpu_name(), "repeats": repeats,
               "metadata_bytes": sum(len(k) + len(v) for k, v in text.items()),
               "python": platform.python_version(), "numpy": np.__version__,
               "pillow": Image.__version__, "zlib": __import__("zlib").ZLIB_RUNTIME_VERSION,
               "load_average_before": os.getloadavg(), "date": dt.date.today().isoformat(), "images": {}}
    thread_counts = [1] if cores == 1 else [1, cores]
    cases = []
    for compression in image_files.PNG_COMPRESSION:
        for threads in thread_counts:
            cases.append((f"png {compression}", threads,
                          lambda px, c=compression, t=threads: image_files.encode_png(px, text, compression=c,
                                                                                       threads=t)))
    for quality, method in ((90, 0), (90, 2), (90, 4), (80, 0)):
        cases.append((f"webp q{quality} m{method}", 1,
                      lambda px, q=quality, m=method: image_files.encode_webp(px, text, quality=q, method=m)))
    for quality in (90, 95):
        cases.append((f"jpeg q{quality}", 1, lambda px, q=quality: image_files.encode_jpeg(px, text, quality=q)))

    def pillow_level4(px):
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "PNG", pnginfo=info, compress_level=4)
        return buf.getvalue()

    cases.append(("pillow png level 4 (SaveImage's encoder)", 1, pillow_level4))

    with tempfile.TemporaryDirectory() as tmp:
        for name, pixels in images(size).items():
            rows = []
            print(f"{name}:")
            for label, threads, fn in cases:
                timing, data = timed(lambda fn=fn, px=pixels: fn(px), repeats)
                if label.startswith("png"):
                    decoded = np.asarray(Image.open(io.BytesIO(data)))
                    assert np.array_equal(decoded, pixels), f"{label} did not decode to the input"
                    assert image_files.read_metadata(data) == text
                rows.append({"what": label, "threads": threads, **timing, "bytes": len(data)})
                print(f"  {label:44s} threads {threads:3d}: {timing['min_ms']:8.1f} ms min "
                      f"{timing['median_ms']:8.1f} median  {len(data) / 1e6:6.3f} MB")
            # Whole paths, float IMAGE tensor in, file on disk out.
            tensor = torch.from_numpy(pixels.astype(np.float32) / 255.0)[None]
            for fmt in ("png", "png_fast", "webp", "jpeg"):
                path = Path(tmp) / f"ours{image_files.FORMATS[fmt][0]}"

                def ours(f=fmt, p=path, t=tensor):
                    image_files.write_file(p, image_files.encode(image_files.to_uint8(t)[0], f, text, 90))

                timing, _ = timed(ours, repeats)
                rows.append({"what": f"node path: {fmt} (to_uint8 + encode + write)", "threads": cores, **timing,
                             "bytes": path.stat().st_size})
                print(f"  node path {fmt:10s}: {timing['min_ms']:8.1f} ms min {timing['median_ms']:8.1f} median")
            if save_image is not None:
                saver = save_image()
                saver.output_dir = tmp

                def native(s=saver, t=tensor):
                    return s.save_images(t, "native", prompt=prompt, extra_pnginfo=extra)

                timing, out = timed(native, repeats)
                file = Path(tmp) / out["ui"]["images"][0]["filename"]
                rows.append({"what": "ComfyUI SaveImage (float tensor in, file out)", "threads": 1, **timing,
                             "bytes": file.stat().st_size})
                print(f"  ComfyUI SaveImage: {timing['min_ms']:8.1f} ms min {timing['median_ms']:8.1f} median")
            results["images"][name] = {"raw_bytes": int(pixels.size), "rows": rows}
    results["load_average_after"] = os.getloadavg()
    return results


# ---------------------------------------------------------------------------------------------- report

def to_markdown(r: dict) -> str:
    about = (f"CPU: {r['cpu']}, {r['cores']} cores usable; Python {r['python']}, numpy {r['numpy']}, "
             f"Pillow {r['pillow']}, zlib {r['zlib']}. Metadata: {r['metadata_bytes']} bytes (a workflow of this "
             f"package and its API prompt). Median and minimum of {r['repeats']} runs after a warm-up; load average "
             f"before {r['load_average_before'][0]:.2f}, after {r['load_average_after'][0]:.2f} (a loaded machine "
             "shows in the medians first).")
    out = [f"# Saving one {r['size']}x{r['size']} image ({r['date']})", "", about, ""]
    for name, block in r["images"].items():
        raw = block["raw_bytes"]
        out += [f"## {name}", "", "| what | threads | min ms | median ms | size | of raw |", "|---|---|---|---|---|---|"]
        for row in block["rows"]:
            out.append(f"| {row['what']} | {row['threads']} | {row['min_ms']:.1f} | {row['median_ms']:.1f} | "
                       f"{row['bytes'] / 1e6:.3f} MB | {row['bytes'] / raw:.0%} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "encode")
    args = parser.parse_args(argv)
    result = run(args.size, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['date']}-{cpu_slug(result['cpu'], result['cores'])}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result) + "\n")
    print(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

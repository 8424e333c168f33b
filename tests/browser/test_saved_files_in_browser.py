"""Files from the Save Image node in the real front end: Chromium decodes them, and dropping one on the canvas
(the front end's own file handler) loads the workflow stored inside."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from devtools.graphs import MODEL, TEXT_ENCODER, VAE
from tests.workflows.workflow_files import ui_workflow

SUGAR = ui_workflow("zimage_sugar")

# Fetch the file as the browser would get it from a drag, decode it, read its metadata with the front end's
# readers, then hand it to the front end's drop handler.
DROP_JS = """async ([url, name, type]) => {
    const blob = await (await fetch(url)).blob();
    const file = new File([blob], name, { type });
    const bitmap = await createImageBitmap(blob);
    const info = window.comfyAPI.pnginfo;
    const meta = type === "image/png" ? await info.getPngMetadata(file) : await info.getWebpMetadata(file);
    const app = window.comfyAPI.app.app;
    await app.loadGraphData({ last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {},
                              extra: {}, version: 0.4 }, true, false);
    await app.handleFile(file);
    const graph = app.graph.serialize();
    return { width: bitmap.width, height: bitmap.height, meta,
             types: graph.nodes.map((n) => n.type).sort(),
             sampler: graph.nodes.find((n) => n.type === "ZImageTurboSampler")?.widgets_values };
}"""


def graph(fmt: str, seed: int) -> dict:
    return {
        "1": {"class_type": "ZImageTurboLoader", "inputs": {"model": MODEL, "text_encoder": TEXT_ENCODER, "vae": VAE,
                                                            "dtype": "fp32", "device": "auto", "memory": "resident"}},
        "3": {"class_type": "ZImageTurboSampler", "inputs": {
            "pipe": ["1", 0], "prompt": "a cat", "negative_prompt": "", "width": 64, "height": 48, "steps": 2,
            "cfg": 0.0, "shift": 3.0, "seed": seed, "batch_size": 1}},
        "5": {"class_type": "ZImageTurboSave", "inputs": {"images": ["3", 0], "filename_prefix": f"browser_{fmt}",
                                                          "format": fmt, "quality": 80}},
    }


def saved_file(server, prompt: dict) -> dict:
    status, body = server.client.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex,
                                                  "extra_data": {"extra_pnginfo": {"workflow": SUGAR}}})
    assert status == 200, body
    deadline = time.time() + 300
    while time.time() < deadline:
        entry = server.client.history(body["prompt_id"])
        if entry:
            assert entry["status"]["status_str"] == "success", entry["status"]
            return entry["outputs"]["5"]["images"][0]
        time.sleep(0.05)
    raise AssertionError("the prompt did not finish")


@pytest.mark.uis("vendored-classic", "newest-classic")
@pytest.mark.parametrize("fmt,mime", [("png", "image/png"), ("png_fast", "image/png"), ("webp", "image/webp")])
def test_a_saved_file_dropped_on_the_canvas_loads_its_workflow(comfy_page, frontend_server, fmt, mime):
    prompt = graph(fmt, seed=300)
    info = saved_file(frontend_server, prompt)
    url = f"/view?filename={info['filename']}&subfolder={info['subfolder']}&type={info['type']}"
    shown = comfy_page.page.evaluate(DROP_JS, [url, info["filename"], mime])
    assert (shown["width"], shown["height"]) == (64, 48)
    assert json.loads(shown["meta"]["workflow"]) == SUGAR
    assert json.loads(shown["meta"]["prompt"]) == prompt
    assert shown["types"] == sorted(n["type"] for n in SUGAR["nodes"])
    sugar_sampler = next(n for n in SUGAR["nodes"] if n["type"] == "ZImageTurboSampler")
    assert shown["sampler"][0] == sugar_sampler["widgets_values"][0]  # the Sugar prompt, from the file
    assert comfy_page.visible_dialogs() == [] and comfy_page.notices() == []


READ_WEBP_JS = """async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const file = new File([bytes], "x.webp", { type: "image/webp" });
    const bitmap = await createImageBitmap(file);
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const context = canvas.getContext("2d");
    context.drawImage(bitmap, 0, 0);
    const pixels = Array.from(context.getImageData(0, 0, bitmap.width, bitmap.height).data);
    return { width: bitmap.width, pixels, meta: await window.comfyAPI.pnginfo.getWebpMetadata(file) };
}"""


@pytest.mark.uis("vendored-classic", "newest-classic")
def test_webp_metadata_is_found_behind_an_image_chunk_of_odd_size(comfy_page, ui):
    """The vendored front end skips no pad byte between RIFF chunks: the files libwebp writes with an odd-sized
    image chunk (lossless or alpha; lossy RGB data is padded by libwebp itself) lose their workflow there, the same
    images saved by image_files do not (in either front end), and Chromium decodes them."""
    import base64

    import numpy as np

    from zimage_turbo.engine.files import image_files

    text = image_files.comfy_metadata({"1": {"class_type": "X", "inputs": {}}}, {"workflow": SUGAR})
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        width = int(rng.integers(16, 200))
        image = rng.integers(0, 256, (40, width, 3), dtype=np.uint8)
        ours = image_files.encode_webp(image, text, quality=70, lossless=True)
        libwebp = image_files._pillow_image(image)
        raw = __import__("io").BytesIO()
        libwebp.save(raw, "WEBP", quality=70, lossless=True, method=2, exif=image_files.exif_bytes(text), exact=True)
        if raw.getvalue() == ours:
            continue  # the image chunk was even already
        plain = comfy_page.page.evaluate(READ_WEBP_JS, base64.b64encode(raw.getvalue()).decode())
        fixed = comfy_page.page.evaluate(READ_WEBP_JS, base64.b64encode(ours).decode())
        if ui.frontend == "vendored":
            assert "workflow" not in plain["meta"]  # the front end's walk misses it in libwebp's file
        assert json.loads(fixed["meta"]["workflow"]) == SUGAR and fixed["width"] == width
        rgba = np.asarray(fixed["pixels"], np.uint8).reshape(40, width, 4)
        assert np.array_equal(rgba[..., :3], image)  # lossless: Chromium decodes exactly the pixels
        checked += 1
        if checked == 4:
            break
    assert checked == 4

"""Regenerate the saved workflows with the real front end: workflows/<title>.json (UI), their thumbnails
workflows/<title>.jpg (what ComfyUI's template browser shows on the card) and workflows/api/<name>.json (API).

Not a test. Run it after changing a workflow below, the layout or the LoRA Stack's front end:

    .venv/bin/python -m tests.workflows.export_workflows                  (from the repository root)
    .venv/bin/python -m tests.workflows.export_workflows --thumbnails     (only the pictures, from the saved files)

It starts ComfyUI 0.3.75 (--cpu, a temporary base directory whose model folders hold empty
files under the real model names, so the combos list them), builds each workflow on the
canvas in headless Chromium with ComfyUI's own createNode/connect and our extension, and
writes what the front end itself produces: `app.graph.serialize()` for the UI file (what
"Save" writes) and `app.graphToPrompt().output` for the API twin (what "Export (API)"
writes). The UI file is then loaded back and must give the same prompt again. The thumbnail is a
screenshot of that graph as the canvas draws it (focus mode, fitted to a square window): a picture of
the workflow, not of an image it makes (no real model runs here).
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import uuid
from pathlib import Path

from devtools.graphs import MODEL, STYLE_LORAS, TEXT_ENCODER, VAE
from scripts.comfy_client import ComfyServer
from tests.browser.comfy_page import INIT_SCRIPT, VIEWPORT, ComfyPage, launch_chromium, prepare_server
from tests.workflows.workflow_files import NAMES, api_path, thumbnail_path, ui_path, ui_workflow

SEED = 42
COMMON_SETTINGS = "8 steps, cfg 0, shift 3 (Z-Image Turbo's distilled schedule), seed 42 fixed."
BASE_FILES = (
    f"Base model: {MODEL} in models/diffusion_models, {TEXT_ENCODER} in models/text_encoders, "
    f"{VAE} in models/vae."
)

SUGAR, NIANNIAN, SUN = STYLE_LORAS["sugar"], STYLE_LORAS["niannian"], STYLE_LORAS["sun_zhenni"]

# One entry per workflow file: LoRA rows, size, prompt and the Note shown next to the graph.
STYLES = {
    "zimage_sugar": {
        "title": "Sugar face",
        "loras": [{"lora": SUGAR, "strength": 1.0, "on": True}],
        "width": 512,
        "height": 768,
        "prompt": "Sugar面部,纯欲甜妹脸部,淡颜系清甜长相,清透水光肌,微醺蜜桃腮红,薄涂裸粉唇釉,眼尾轻挑带慵懒笑意,细碎睫毛轻颤",
        "note": f"""Sugar face LoRA for Z-Image Turbo

LoRA file: {SUGAR}
Put it in ComfyUI/models/loras/ (then press R in ComfyUI to refresh the lists).
{BASE_FILES}

Trigger phrase: Sugar面部 (start the prompt with it).
Prompt structure from the article: Sugar面部, [肤质 skin] + [腮红 blush] + [唇妆 lips] + [眼神 gaze] + [睫毛 lashes].
Describe concrete facial features. Avoid "masterpiece, best quality, 8k, ultra detailed": the article found they add nothing or distort the features.

Recommended settings (as published): strength 1.0, 512 x 768 (width x height).
Keep 512x768 and upscale afterwards if you need a bigger image.
{COMMON_SETTINGS}""",
    },
    "zimage_niannian": {
        "title": "Niannian",
        "loras": [{"lora": NIANNIAN, "strength": 0.85, "on": True}],
        "width": 1024,
        "height": 1024,
        "prompt": "portrait of a young woman by a window, soft natural light, detailed face, "
                  "silk dress catching the light, natural background blur",
        "note": f"""Niannian LoRA (meixiong) for Z-Image Turbo

LoRA file: {NIANNIAN} (about 186 MB)
Put it in ComfyUI/models/loras/ (then press R in ComfyUI to refresh the lists).
{BASE_FILES}

Trigger phrase: none; this workflow uses a plain prompt and the style comes from the LoRA's strength. Describe what it does best: faces, light on fabric, a natural background blur.

Recommended settings: strength 0.85, the article's balance point (higher over-exposes, lower weakens the style); 1024 x 1024.
{COMMON_SETTINGS}""",
    },
    "zimage_sun_zhenni": {
        "title": "Sun Zhenni",
        "loras": [{"lora": SUN, "strength": 1.0, "on": True}],
        "width": 1024,
        "height": 1024,
        "prompt": "portrait of sun zhen ni, studio lighting, soft focus, elegant dress, cinematic style, "
                  "ultra-detailed skin texture",
        "note": f"""Sun Zhenni LoRA for Z-Image Turbo

LoRA file: {SUN}
Put it in ComfyUI/models/loras/ (then press R in ComfyUI to refresh the lists).
{BASE_FILES}

Trigger phrase: sun zhen ni (孙珍妮).
The article's advice: write the subject in Chinese plus English style words; its example:
孙珍妮,旗袍,上海外滩,黄昏,胶片颗粒,王家卫风格

Recommended settings: strength 1.0, 1024 x 1024 (the article's sweet spot: keep it).
{COMMON_SETTINGS}""",
    },
    "zimage_combined_styles": {
        "title": "Sun Zhenni + Niannian",
        "loras": [
            {"lora": SUN, "strength": 0.7, "on": True},
            {"lora": NIANNIAN, "strength": 0.5, "on": True},
        ],
        "width": 1024,
        "height": 1024,
        "prompt": "portrait of sun zhen ni by a window, soft natural light, silk dress catching the light, "
                  "natural background blur, cinematic style",
        "note": f"""Two styles at once: Sun Zhenni + Niannian

LoRA files: {SUN} (row 1, strength 0.7) and {NIANNIAN} (row 2, strength 0.5).
Put both in ComfyUI/models/loras/ (then press R in ComfyUI to refresh the lists).
{BASE_FILES}

One LoRA Stack with two rows: switch a row off to compare, drag strengths, or add more rows. (Stacks also chain: a second stack can feed this one's lora_stack input.)
Both strengths are below the single-style ones (1.0 and 0.85) so the two styles blend instead of over-exposing.

Trigger phrase: sun zhen ni (for the Sun Zhenni LoRA); Niannian needs none.
Settings: 1024 x 1024. {COMMON_SETTINGS}""",
    },
}

# Four columns, read left to right: the Note, loader over LoRA Stack, sampler, probe over Save Image. Nothing sits
# below the LoRA Stack, so it can grow row by row. Each node gets the room it takes in the tallest node rendering:
# "Nodes 2.0" (Vue) draws widgets taller than the classic canvas and adds a source badge row (measured bodies in
# canvas units, classic / Vue 1.58.1 / Vue 1.42.8: loader 202 / 254 / 315, probe 334 / 334 / 372); `room` reserves
# that. `gap` leaves the next node's title bar (30) and the newer front ends' source badge above it free.
# tests/browser/test_layout.py checks the result in every front end / rendering it runs.
LAYOUT = {
    "columns": [[0, ["note"]], [480, ["loader", "stack"]], [940, ["sampler"]], [1440, ["probe", "save"]]],
    "top": 0,
    "gap": 80,
    # width, least height, room (canvas units)
    "size": {"note": [420, 560, 0], "loader": [400, 0, 330], "stack": [400, 0, 0], "sampler": [440, 560, 0],
             "probe": [380, 0, 380], "save": [380, 480, 0]},
}
# The thumbnails: the graph fitted to a window large enough that the canvas draws it in full detail (below ~60 %
# zoom it leaves out text and widgets), cut to the nodes plus a margin and saved THUMBNAIL_WIDTH wide (the cards
# show a .jpg whole, "object-contain", so any aspect ratio fits).
THUMBNAIL_WINDOW = {"width": 1600, "height": 1200}
THUMBNAIL_WIDTH = 768
THUMBNAIL_MARGIN = 24  # page pixels around the nodes
# Only the graph in the picture: no canvas statistics, zoom buttons or minimap.
THUMBNAIL_SETTINGS = {"Comfy.Graph.CanvasInfo": False, "Comfy.Graph.CanvasMenu": False, "Comfy.Minimap.Visible": False}

BUILD_JS = """async (spec) => {
    const app = window.comfyAPI.app.app;
    const empty = { last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [], config: {}, extra: {}, version: 0.4 };
    await app.loadGraphData(empty, true, false);
    const nodes = {};
    const make = (type, key, values = {}) => {
        const node = LiteGraph.createNode(type);
        app.graph.add(node);
        for (const [name, value] of Object.entries(values)) {
            const widget = node.widgets.find((w) => w.name === name);
            if (!widget) throw new Error(`${type} has no widget ${name}`);
            widget.value = value;
        }
        return (nodes[key] = node);
    };
    const loader = make("ZImageTurboLoader", "loader", spec.loader);
    const stack = make("ZImageTurboLoraStack", "stack");
    // Set the rows through the editor, so the JSON is exactly what the UI writes when a user edits.
    stack.zimageLoraEditor.rows = spec.loras.map((r) => ({ ...r }));
    stack.zimageLoraEditor.commit(true);
    const sampler = make("ZImageTurboSampler", "sampler", spec.sampler);
    const probe = make("ZImageTurboProbe", "probe");
    const save = make("ZImageTurboSave", "save", { filename_prefix: spec.prefix, format: "png" });
    const note = make("Note", "note", { text: spec.note });
    note.title = spec.noteTitle;
    note.color = "#432";
    note.bgcolor = "#653";
    for (const [x, keys] of spec.layout.columns) {
        let y = spec.layout.top;
        for (const key of keys) {
            const node = nodes[key];
            const [width, minHeight, room] = spec.layout.size[key];
            node.pos = [x, y];
            node.setSize([width, Math.max(minHeight, node.computeSize()[1])]);
            y += Math.max(node.size[1], room) + spec.layout.gap;
        }
    }
    loader.connect(0, sampler, "pipe");
    stack.connect(0, sampler, "lora_stack");
    sampler.connect(0, probe, "images");
    sampler.connect(2, probe, "report");
    probe.connect(0, save, "images");
    app.graph.setDirtyCanvas(true, true);
    return app.graph.serialize();
}"""


def spec_for(name: str, style: dict) -> dict:
    return {
        "layout": LAYOUT,
        "loader": {"model": MODEL, "text_encoder": TEXT_ENCODER, "vae": VAE, "dtype": "auto", "device": "auto",
                   "memory": "resident"},
        "loras": style["loras"],
        "sampler": {"prompt": style["prompt"], "negative_prompt": "", "width": style["width"],
                    "height": style["height"], "steps": 8, "cfg": 0.0, "shift": 3.0, "seed": SEED,
                    "control_after_generate": "fixed", "batch_size": 1},
        "prefix": name,
        "note": style["note"],
        "noteTitle": f"Read me: {style['title']}",
    }


def drop_nulls(value):
    """The live graph serializes unset slot fields as null; saved files leave them out."""
    if isinstance(value, dict):
        return {k: drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nulls(v) for v in value]
    return value


def tidy(name: str, workflow: dict) -> dict:
    workflow = drop_nulls(workflow)
    workflow["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-zimage-turbo/workflows/{name}"))
    extra = dict(workflow.get("extra") or {})
    extra.pop("ds", None)  # no saved view: ComfyUI fits the graph to the window on load
    workflow["extra"] = extra
    return workflow


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def export(page: ComfyPage) -> None:
    assert set(STYLES) == set(NAMES), "every workflow has a title in workflow_files.TITLES"
    for name in NAMES:
        style = STYLES[name]
        ui = tidy(name, page.page.evaluate(BUILD_JS, spec_for(name, style)))
        api_prompt = page.graph_to_prompt()
        # The file as written must load back to the same prompt.
        page.load_workflow(ui)
        assert page.graph_to_prompt() == api_prompt, f"{name}: reloading the UI file changed the prompt"
        assert not page.visible_dialogs(), f"{name}: dialogs after loading: {page.visible_dialogs()}"
        write_json(ui_path(name), ui)
        write_json(api_path(name), api_prompt)
        print(f"wrote workflows/{ui_path(name).name} and workflows/api/{api_path(name).name}")


def thumbnail(page: ComfyPage, workflow: dict) -> bytes:
    """A JPEG of the graph as the canvas draws it: ComfyUI's focus mode (no menus), the graph fitted to the window."""
    from PIL import Image

    page.load_workflow(workflow)
    page.page.evaluate("""async (settings) => {
        const { command, setting } = window.comfyAPI.app.app.extensionManager;
        for (const [id, value] of Object.entries(settings)) await setting.set(id, value);
        await command.execute("Workspace.ToggleFocusMode");
        await command.execute("Comfy.Canvas.FitView");
    }""", THUMBNAIL_SETTINGS)
    page.settle(6)
    picture = Image.open(io.BytesIO(page.page.screenshot())).convert("RGB")
    rects = [r for r in page.node_rects().values() if r]
    page.page.evaluate("""() => window.comfyAPI.app.app.extensionManager.command.execute("Workspace.ToggleFocusMode")""")
    left = max(0, min(r["x"] for r in rects) - THUMBNAIL_MARGIN)
    top = max(0, min(r["y"] for r in rects) - THUMBNAIL_MARGIN)
    right = min(picture.width, max(r["x"] + r["width"] for r in rects) + THUMBNAIL_MARGIN)
    bottom = min(picture.height, max(r["y"] + r["height"] for r in rects) + THUMBNAIL_MARGIN)
    picture = picture.crop((round(left), round(top), round(right), round(bottom)))
    size = (THUMBNAIL_WIDTH, round(picture.height * THUMBNAIL_WIDTH / picture.width))
    out = io.BytesIO()
    picture.resize(size, Image.LANCZOS).save(out, "JPEG", quality=90, optimize=True, progressive=True)
    return out.getvalue()


def write_thumbnails(page: ComfyPage) -> None:
    for name in NAMES:
        thumbnail_path(name).write_bytes(thumbnail(page, ui_workflow(name)))
        print(f"wrote workflows/{thumbnail_path(name).name}")


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--thumbnails", action="store_true", help="only take the pictures of the saved workflows")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(Path(tmp))
        server.prepare()
        models = Path(tmp) / "models"
        for folder, name in [("diffusion_models", MODEL), ("text_encoders", TEXT_ENCODER), ("vae", VAE),
                             *[("loras", n) for n in STYLE_LORAS.values()]]:
            (models / folder / name).write_bytes(b"")  # names only: nothing is loaded while exporting
        with server, sync_playwright() as pw:
            prepare_server(server.client)
            browser = launch_chromium(pw)
            try:
                if not args.thumbnails:
                    context = browser.new_context(viewport=VIEWPORT)
                    context.add_init_script(INIT_SCRIPT)
                    export(ComfyPage(context.new_page(), server.client.base).open())
                    context.close()
                context = browser.new_context(viewport=THUMBNAIL_WINDOW)
                context.add_init_script(INIT_SCRIPT)
                write_thumbnails(ComfyPage(context.new_page(), server.client.base).open())
            finally:
                browser.close()


if __name__ == "__main__":
    main()

"""Regenerate workflows/*.json (UI) and workflows/api/*.json (API) with the real front end.

Not a test. Run it after changing a workflow below or the LoRA Stack's front end:

    .venv/bin/python tests/workflows/export_workflows.py

It starts ComfyUI 0.3.75 (--cpu, a temporary base directory whose model folders hold empty
files under the real model names, so the combos list them), builds each workflow on the
canvas in headless Chromium with ComfyUI's own createNode/connect and our extension, and
writes what the front end itself produces: `app.graph.serialize()` for the UI file (what
"Save" writes) and `app.graphToPrompt().output` for the API twin (what "Export (API)"
writes). The UI file is then loaded back and must give the same prompt again.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO / "tests" / "browser")]

from comfy_client import ComfyServer  # noqa: E402
from comfy_page import VIEWPORT, ComfyPage, launch_chromium, prepare_server  # noqa: E402
from model_names import MODEL, STYLE_LORAS, TEXT_ENCODER, VAE  # noqa: E402

WORKFLOWS = REPO / "workflows"
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

# Node widths (heights follow the widgets) and the minimum heights of the nodes that grow.
# Three columns, each node under the previous one: everything fits a 1920x1080 window at zoom 1.
LAYOUT = {
    "columns": [[20, ["loader", "stack", "note"]], [490, ["sampler"]], [960, ["probe", "save"]]],
    "top": 60,
    "gap": 50,  # room for the next node's title bar
    "size": {"loader": [330, 0], "stack": [430, 0], "note": [430, 400], "sampler": [430, 520],
             "probe": [360, 0], "save": [360, 420]},
}

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
            const [width, minHeight] = spec.layout.size[key];
            node.pos = [x, y];
            node.setSize([width, Math.max(minHeight, node.computeSize()[1])]);
            y += node.size[1] + spec.layout.gap;
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
    for name, style in STYLES.items():
        ui = tidy(name, page.page.evaluate(BUILD_JS, spec_for(name, style)))
        api_prompt = page.graph_to_prompt()
        # The file as written must load back to the same prompt.
        page.load_workflow(ui)
        assert page.graph_to_prompt() == api_prompt, f"{name}: reloading the UI file changed the prompt"
        assert not page.visible_dialogs(), f"{name}: dialogs after loading: {page.visible_dialogs()}"
        write_json(WORKFLOWS / f"{name}.json", ui)
        write_json(WORKFLOWS / "api" / f"{name}.json", api_prompt)
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


def main() -> None:
    from playwright.sync_api import sync_playwright

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
                context = browser.new_context(viewport=VIEWPORT)
                context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true');")
                export(ComfyPage(context.new_page(), server.client.base).open())
            finally:
                browser.close()


if __name__ == "__main__":
    main()

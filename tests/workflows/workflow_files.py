"""Where each saved workflow lives: one place for the exporter, the workflow tests and the browser tests.

A workflow has a short name (its API twin `workflows/api/<name>.json`, the prefix of the images it saves) and a
title. The UI file is `workflows/<title>.json` with its thumbnail `workflows/<title>.jpg` beside it, because
ComfyUI's template browser (0.3.75's server with its own front end and with the newest one alike) shows a custom
node pack's template under its file name and reads no title or description from anywhere else; it fetches
`<file name>.jpg` as the card's picture.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
WORKFLOWS = REPO / "workflows"
PACK = "comfyui-zimage-turbo"  # the folder name users clone into (README), the template browser's category

# short name -> title (the UI file's name). Letters, digits, spaces, "-" only: the same on every file system
# and in a URL; the older front end shows the title with "-" and "_" turned into spaces as the description.
TITLES = {
    "zimage_sugar": "Z-Image Turbo - Sugar face LoRA",
    "zimage_niannian": "Z-Image Turbo - Niannian LoRA",
    "zimage_sun_zhenni": "Z-Image Turbo - Sun Zhenni LoRA",
    "zimage_combined_styles": "Z-Image Turbo - Two style LoRAs",
}
NAMES = list(TITLES)


def ui_path(name: str) -> Path:
    return WORKFLOWS / f"{TITLES[name]}.json"


def api_path(name: str) -> Path:
    return WORKFLOWS / "api" / f"{name}.json"


def thumbnail_path(name: str) -> Path:
    return WORKFLOWS / f"{TITLES[name]}.jpg"


def ui_workflow(name: str) -> dict:
    return json.loads(ui_path(name).read_text(encoding="utf-8"))


def api_workflow(name: str) -> dict:
    return json.loads(api_path(name).read_text(encoding="utf-8"))

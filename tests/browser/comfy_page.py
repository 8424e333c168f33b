"""Drive the real ComfyUI front end in Debian's Chromium with Playwright (sync API).

Shared by the browser tests and by tests/workflows/export_workflows.py. Playwright never
downloads a browser here: it launches /usr/bin/chromium (`make browser` installs it).

Two front ends and two node renderings are driven (a `UI`): the front end ComfyUI 0.3.75 pins
("vendored", from its comfyui-frontend-package) and the newest one that scripts/setup.sh fetches
into .build/frontend/<version>/static ("newest", served with --front-end-root); each in the classic
canvas or in "Nodes 2.0" (Vue nodes, setting Comfy.VueNodes.Enabled). The helpers read what is on
screen: where a node is drawn, what a user can click, the message a refused prompt shows.
"""

from __future__ import annotations

import atexit
import json
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
]
VIEWPORT = {"width": 1920, "height": 1080}
FRONTENDS_DIR = REPO / ".build" / "frontend"  # scripts/setup.sh puts the newest front end here
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"

# Front-end settings stored on the server before a page opens: no first-run template browser,
# and the warnings we assert on stay switched on.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
}

# Runs in the page before ComfyUI's scripts: hide the "Nodes 2.0" banner (it only takes room).
INIT_SCRIPT = "localStorage.setItem('vueNodesBannerDismissed', 'true');"

# Installed once the app is up: a log of the execution events the page receives on its websocket.
RECORD_EVENTS_JS = """() => {
    const api = window.comfyAPI.api.api;
    window.__zimageEvents = [];
    for (const type of ["execution_start", "executed", "execution_success", "execution_error",
                        "execution_interrupted", "execution_cached"]) {
        api.addEventListener(type, (e) => window.__zimageEvents.push({ type, detail: e.detail }));
    }
}"""

APP_READY_JS = """() => {
    const app = window.comfyAPI?.app?.app;
    if (!app?.vueAppReady || !app.graph || !app.canvas) return false;
    const names = (app.extensions || []).map((e) => e.name);
    return names.includes("ZImageTurbo.LoraStackRows") && names.includes("ZImageTurbo.ProbeFigures")
        && !!document.querySelector('[data-testid="queue-button"]');
}"""

# Each node's rectangle on screen (CSS pixels of the page), title bar included: a Vue node is an element,
# a classic node is drawn on the canvas at (pos - title, size) through the canvas transform.
NODE_RECTS_JS = """(vue) => {
    const app = window.comfyAPI.app.app;
    const canvas = app.canvas;
    const box = canvas.canvas.getBoundingClientRect();
    const [ox, oy] = canvas.ds.offset, scale = canvas.ds.scale;
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const rects = {};
    for (const node of app.graph.nodes) {
        let r;
        if (vue) {
            const el = document.querySelector(`[data-node-id="${node.id}"]`);
            if (!el) { rects[node.id] = null; continue; }
            const b = el.getBoundingClientRect();
            r = { x: b.left, y: b.top, width: b.width, height: b.height };
        } else {
            r = { x: box.left + (node.pos[0] + ox) * scale, y: box.top + (node.pos[1] - title + oy) * scale,
                  width: node.size[0] * scale, height: (node.size[1] + title) * scale };
        }
        rects[node.id] = { ...r, type: node.type, title: node.title, scale };
    }
    return rects;
}"""

# Is the centre of the element the element a click lands on (nothing drawn over it)?
HIT_TEST_JS = """(el) => {
    const b = el.getBoundingClientRect();
    const hit = document.elementFromPoint(b.left + b.width / 2, b.top + b.height / 2);
    return { hit: !!hit && (hit === el || el.contains(hit)), on: hit ? hit.outerHTML.slice(0, 200) : null };
}"""

FINISHED = ("execution_success", "execution_error", "execution_interrupted")


@dataclass(frozen=True)
class UI:
    """A front end ("vendored": the one ComfyUI 0.3.75 pins; "newest": .build/frontend) and a node rendering."""

    frontend: str
    rendering: str  # "classic" | "vue"

    @property
    def id(self) -> str:
        return f"{self.frontend}-{self.rendering}"

    @property
    def vue(self) -> bool:
        return self.rendering == "vue"


def newest_frontend() -> tuple[str, Path] | None:
    """(version, static folder) of the newest front end scripts/setup.sh fetched, or None."""
    found = []
    for index in FRONTENDS_DIR.glob("*/static/index.html"):
        version = index.parent.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version):
            found.append((tuple(int(p) for p in version.split(".")), version, index.parent))
    if not found:
        return None
    _, version, static = max(found)
    return version, static


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


_shared: dict = {}


def shared_chromium():
    """The process's one Chromium. Playwright's sync API runs one driver per thread and refuses a second
    `sync_playwright()` while one is running, so every test of a pytest session that needs a browser (the browser
    tests' fixtures and any other test) takes this one instead of starting its own. Closed when the process ends."""
    if "browser" not in _shared or not _shared["browser"].is_connected():
        from playwright.sync_api import sync_playwright

        if "playwright" not in _shared:
            _shared["playwright"] = sync_playwright().start()
            atexit.register(_close_shared)
        _shared["browser"] = launch_chromium(_shared["playwright"])
    return _shared["browser"]


def _close_shared() -> None:
    try:
        if "browser" in _shared:
            _shared.pop("browser").close()
        if "playwright" in _shared:
            _shared.pop("playwright").stop()
    except Exception:  # the driver may already be gone at exit
        pass


def prepare_server(client) -> None:
    status, body = client.post("/settings", FRONTEND_SETTINGS)
    assert status == 200, f"POST /settings failed: {status} {body!r}"


def overlaps(a: dict, b: dict, margin: float = 0.0) -> bool:
    """Do two rectangles come closer than `margin` pixels?"""
    return (a["x"] < b["x"] + b["width"] + margin and b["x"] < a["x"] + a["width"] + margin
            and a["y"] < b["y"] + b["height"] + margin and b["y"] < a["y"] + a["height"] + margin)


class ComfyPage:
    """One ComfyUI tab: open it, load workflows, queue with the Run button, read what the nodes show."""

    def __init__(self, page, base_url: str, rendering: str = "classic"):
        self.page = page
        self.base_url = base_url.rstrip("/")
        self.vue = rendering == "vue"
        self.console_errors: list[str] = []
        self.dirty = False  # a test left dialogs, panels or errors behind: reload before the next one
        page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))

    # ---------------------------------------------------------------- page
    def open(self, timeout_ms: int = 120_000) -> "ComfyPage":
        self.page.goto(self.base_url + "/")
        self._ready(timeout_ms)
        return self

    def _ready(self, timeout_ms: int = 120_000) -> None:
        self.page.wait_for_function(APP_READY_JS, timeout=timeout_ms)
        # The rendering is a user setting (stored on the server): set it through the front end's settings API.
        self.page.evaluate("""async ([id, value]) => {
            const setting = window.comfyAPI.app.app.extensionManager.setting;
            if (setting.get(id) !== value) await setting.set(id, value);
        }""", [VUE_NODES_SETTING, self.vue])
        self.page.evaluate(RECORD_EVENTS_JS)
        self.close_dialogs()
        self.dirty = False

    def reload(self) -> None:
        self.page.reload()
        self._ready()

    def reset(self) -> None:
        """Ready for the next test on a shared tab: reloaded when the last one left anything on screen."""
        if self.dirty or self.visible_dialogs() or self.notices():
            self.reload()
        self.console_errors.clear()

    def frontend_version(self) -> str:
        return self.page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? ''")

    def extension_errors(self) -> list[str]:
        """Console errors that come from this package's scripts (the rest is ComfyUI's own noise)."""
        return [e for e in self.console_errors if "comfyui-zimage-turbo" in e or "Z-Image Turbo" in e]

    def visible_dialogs(self) -> list[str]:
        return self.page.locator(".p-dialog:visible").all_inner_texts()

    def close_dialogs(self) -> None:
        for _ in range(5):
            if not self.visible_dialogs():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    def notices(self) -> list[str]:
        """Error and warning messages on screen: the toasts of both front ends (the newest shows a refused prompt
        or a missing model as a small toast with "View details" instead of a dialog)."""
        old = self.page.locator(".p-toast-message-error:visible, .p-toast-message-warn:visible")
        new = self.page.locator('[data-testid="error-overlay"]:visible')
        return old.all_inner_texts() + new.all_inner_texts()

    def dismiss_notices(self) -> None:
        """Close the toasts on screen with their own close buttons."""
        for close in self.page.locator('[data-testid="error-overlay"]:visible [data-testid="error-overlay-dismiss"], '
                                       '.p-toast-message:visible .p-toast-close-button').all():
            close.click()
        self.page.locator('[data-testid="error-overlay"]:visible, .p-toast-message:visible').first.wait_for(
            state="hidden", timeout=5_000)

    def screenshot(self, path: Path, **kwargs) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), **kwargs)

    # ---------------------------------------------------------------- graph
    def load_workflow(self, workflow: dict) -> None:
        self.page.evaluate("(wf) => window.comfyAPI.app.app.loadGraphData(wf)", workflow)
        if self.vue:  # every node is an element on screen before anything is read
            self.page.wait_for_function("""() => window.comfyAPI.app.app.graph.nodes.every(
                (n) => document.querySelector(`[data-node-id="${n.id}"]`))""")
        self.settle()

    def settle(self, frames: int = 3) -> None:
        """Let the canvas draw a few frames (DOM widgets are placed while drawing)."""
        self.page.evaluate(
            "(n) => new Promise((ok) => { const step = (i) => i ? requestAnimationFrame(() => step(i - 1)) : ok(); step(n); })",
            frames,
        )

    def serialize(self) -> dict:
        """The workflow as saving writes it: JSON text of the graph (no undefined fields, which would reach Python
        as None and go back to the page as null)."""
        return self.page.evaluate("() => JSON.parse(JSON.stringify(window.comfyAPI.app.app.graph.serialize()))")

    def graph_to_prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")

    def node_ids(self, node_type: str) -> list[int]:
        return self.page.evaluate(
            "(t) => window.comfyAPI.app.app.graph.nodes.filter((n) => n.type === t).map((n) => n.id)", node_type)

    def node_id(self, node_type: str) -> int:
        ids = self.node_ids(node_type)
        assert len(ids) == 1, f"expected one {node_type} node, found {ids}"
        return ids[0]

    # ---------------------------------------------------------------- on screen
    def node_rects(self) -> dict[str, dict]:
        """Node id (as text: the front ends differ in whether ids are numbers) -> its rectangle on screen (title bar
        included), in page pixels."""
        return self.page.evaluate(NODE_RECTS_JS, self.vue)

    def node_rect(self, node_id) -> dict:
        return self.node_rects()[str(node_id)]

    def overlapping_nodes(self, margin: float = 0.0) -> list[tuple[str, str]]:
        """Pairs of node titles whose rectangles on screen come closer than `margin` pixels."""
        rects = [r for r in self.node_rects().values() if r]
        return [(a["title"], b["title"]) for i, a in enumerate(rects) for b in rects[i + 1:] if overlaps(a, b, margin)]

    def is_hit_target(self, locator) -> dict:
        """Whether a click at the centre of the element reaches it (nothing covers it)."""
        return locator.evaluate(HIT_TEST_JS)

    def visible_text_fields(self) -> list[str]:
        """The values of every text box and text area a user can see."""
        return self.page.locator("textarea:visible, input[type=text]:visible, input:not([type]):visible").evaluate_all(
            "(els) => els.map((e) => e.value)")

    def saved_images(self, node_id: int) -> list[dict]:
        """The images a node shows: drawn on the classic canvas (node.imgs), <img> elements of a Vue node."""
        if self.vue:
            return self.page.locator(f'[data-node-id="{node_id}"] img:visible').evaluate_all(
                "(els) => els.map((i) => ({ src: i.src, width: i.naturalWidth, height: i.naturalHeight }))")
        return self.page.evaluate("""(id) => (window.comfyAPI.app.app.graph.getNodeById(id).imgs || [])
            .map((img) => ({ src: img.src, width: img.naturalWidth, height: img.naturalHeight }))""", node_id)

    # ---------------------------------------------------------------- running
    def clear_events(self) -> None:
        self.page.evaluate("() => { window.__zimageEvents.length = 0; }")

    def events(self) -> list[dict]:
        return self.page.evaluate("() => window.__zimageEvents")

    def click_run(self) -> None:
        """Queue the open workflow the way a user does: the Run button of the action bar."""
        self.clear_events()
        self.page.locator('[data-testid="queue-button"]').click()

    def wait_until_finished(self, timeout_ms: int = 300_000) -> dict:
        self.page.wait_for_function(
            "(kinds) => window.__zimageEvents.some((e) => kinds.includes(e.type))", arg=list(FINISHED),
            timeout=timeout_ms)
        return next(e for e in self.events() if e["type"] in FINISHED)

    def refusal(self, timeout_ms: int = 30_000) -> dict:
        """What the page shows after the server refused a queued prompt, read as a user reads it.

        The vendored front end opens a dialog with the server's messages. The newest shows a small toast that
        names the node and input; its "View details" opens the issues panel, and each issue's info button
        unfolds the server's message. Returns {"where": "dialog" | "toast", "summary": text on screen at once,
        "details": the full text after those clicks}."""
        dialog = self.page.locator(".p-dialog:visible")
        toast = self.page.locator('[data-testid="error-overlay"]:visible')
        self.page.locator('.p-dialog:visible, [data-testid="error-overlay"]:visible').first.wait_for(timeout=timeout_ms)
        self.dirty = True
        if dialog.count():
            text = dialog.first.inner_text()
            return {"where": "dialog", "summary": text, "details": text}
        summary = toast.first.inner_text()
        toast.first.get_by_role("button", name="View details").click()
        infos = self.page.get_by_role("button", name=re.compile(r"^Info for "))
        infos.first.wait_for(timeout=timeout_ms)
        details = []
        for i in range(infos.count()):
            button = infos.nth(i)
            button.click()
            panel = self.page.locator(f'[id="{button.get_attribute("aria-controls")}"]')
            panel.wait_for(timeout=timeout_ms)
            details.append(f"{button.get_attribute('aria-label')}: {panel.inner_text()}")
        return {"where": "toast", "summary": summary, "details": "\n".join(details)}


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))

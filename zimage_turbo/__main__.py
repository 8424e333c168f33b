"""`python -m zimage_turbo check FILE...` (in the node pack's folder, with ComfyUI's Python)."""

from .engine.__main__ import main

raise SystemExit(main())

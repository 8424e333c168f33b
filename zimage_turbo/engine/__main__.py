"""Command line: `python -m zimage_turbo check FILE [FILE ...] [--model FILE] [--json]` (run from the node pack's folder).

Exit status: 0 when every file is usable, 1 when any is refused, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import ZImageError
from .files.check import check_file, reference_from, released_reference


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m zimage_turbo", description="Z-Image-Turbo node pack tools.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser(
        "check",
        help="say what model/LoRA files are and whether this node pack can use them",
        description="Say what each file is (transformer, text encoder, VAE, LoRA, diffusers folder) and whether "
        "this node pack can use it; for a refused file, why. Model files are read from their header only.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help=".safetensors files or diffusers folders")
    check.add_argument("--model", metavar="FILE", help="check LoRAs (and text encoder/VAE sizes) against the transformer "
                       "in FILE instead of the released Z-Image-Turbo")
    check.add_argument("--json", action="store_true", help="print one JSON object per file")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for a usage error
        return int(exc.code or 0)
    if args.command != "check":
        parser.print_usage(sys.stderr)
        print("python -m zimage_turbo: name a command, e.g. `check FILE`.", file=sys.stderr)
        return 2
    try:
        ref = reference_from(args.model) if args.model else released_reference()
    except ZImageError as exc:
        print(f"--model: {exc}", file=sys.stderr)
        return 2
    refused = False
    for path in args.files:
        result = check_file(path, ref)
        refused |= not result.usable
        if args.json:
            print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
        else:
            print("\n".join(result.lines()), flush=True)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())

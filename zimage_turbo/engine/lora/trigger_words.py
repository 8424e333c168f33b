"""Trigger words of a LoRA: what a prompt should contain for the LoRA to show, read from where trainers
and download tools put them. Only the file's safetensors header and small JSON files beside it are read.

Where they come from, first found wins:
  1. beside the file, written by the user's tools (the user's own choice comes first):
     <name>.json ("activation text", A1111/Forge extra-network metadata), <name>.metadata.json
     (Lora-Manager: civitai.trainedWords, or trigger_words), <name>.civitai.info (Civitai helper:
     trainedWords);
  2. the file's metadata, said explicitly: modelspec.trigger_phrase, trigger_words, trigger_phrase,
     activation text, trained_words / trainedWords (a string, a comma-separated string or a JSON list);
  3. kohya's training record: from ss_tag_frequency the tags found in every caption of a dataset
     (count = the dataset's image count from ss_dataset_dirs, else the dataset's top count), at most
     three per dataset; without captions, the dataset folder names of ss_dataset_dirs minus kohya's
     "<repeats>_" prefix ("10_sks dog" -> "sks dog").
Many files have none: the result is then empty.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ZImageError
from ..files.safetensors_io import read_header

MAX_PHRASES = 10
MAX_PHRASE_CHARS = 100
MAX_SIDECAR_BYTES = 1 << 20
_METADATA_FIELDS = ("modelspec.trigger_phrase", "trigger_words", "trigger_phrase", "activation text", "activation_text",
                    "trained_words", "trainedWords")
_SPLIT = re.compile(r"[,，、\n]")
_KOHYA_DIR = re.compile(r"^\d+_(.+)$")


@dataclass(frozen=True)
class TriggerWords:
    words: tuple[str, ...]
    source: str  # where they were read, e.g. "modelspec.trigger_phrase" or "beside the file: x.civitai.info"

    def __bool__(self) -> bool:
        return bool(self.words)


def _phrases(value) -> list[str]:
    """A string, a comma-separated string, a JSON list in a string, or a list: the phrases in it."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return _phrases(json.loads(text))
            except ValueError:
                pass
        parts = _SPLIT.split(text)
    elif isinstance(value, (list, tuple)):
        parts = [p for v in value for p in (_SPLIT.split(v) if isinstance(v, str) else [])]
    else:
        return []
    return _clean(parts)


def _clean(parts) -> list[str]:
    out, seen = [], set()
    for p in parts:
        p = " ".join(str(p).split())[:MAX_PHRASE_CHARS]
        if p and p.lower() not in seen:
            seen.add(p.lower())
            out.append(p)
    return out[:MAX_PHRASES]


def _read_json(path: Path):
    try:
        if not path.is_file() or path.stat().st_size > MAX_SIDECAR_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8", errors="replace"))
    except (OSError, ValueError):
        return None


def _from_sidecars(lora: Path) -> TriggerWords | None:
    stem = lora.with_suffix("")
    for suffix, fields in ((".json", ("activation text", "activation_text", "trigger_words")),
                           (".metadata.json", ("civitai.trainedWords", "trigger_words", "trainedWords")),
                           (".civitai.info", ("trainedWords",))):
        side = stem.parent / (stem.name + suffix)
        data = _read_json(side)
        if not isinstance(data, dict):
            continue
        for field in fields:
            value = data
            for part in field.split("."):
                value = value.get(part) if isinstance(value, dict) else None
            words = _phrases(value) if value is not None else []
            if words:
                return TriggerWords(tuple(words), f"{side.name} ({field})")
    return None


def _from_kohya(metadata: dict) -> TriggerWords | None:
    dirs = {}
    try:
        raw = json.loads(metadata.get("ss_dataset_dirs") or "{}")
        dirs = raw if isinstance(raw, dict) else {}
    except ValueError:
        pass
    try:
        freq = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        freq = {}
    words: list[str] = []
    if isinstance(freq, dict):
        for dataset, tags in freq.items():
            if not isinstance(tags, dict) or not tags:
                continue
            counts = {str(t).strip(): n for t, n in tags.items() if isinstance(n, (int, float)) and str(t).strip()}
            if not counts:
                continue
            info = dirs.get(dataset) if isinstance(dirs.get(dataset), dict) else {}
            every = info.get("img_count") if isinstance(info.get("img_count"), int) else max(counts.values())
            # In every caption: a trigger is written into each caption, a description is not.
            words += [t for t, n in counts.items() if n >= every][:3]
    if words:
        return TriggerWords(tuple(_clean(words)), "ss_tag_frequency (tags in every caption)")
    names = [m.group(1) for d in dirs if (m := _KOHYA_DIR.match(str(d).strip()))]
    if names:
        return TriggerWords(tuple(_clean(names)), "ss_dataset_dirs (kohya folder names)")
    return None


def read_trigger_words(path: Path) -> TriggerWords:
    """The trigger words of the LoRA file at `path` (empty when it names none). Reads headers only."""
    path = Path(path)
    side = _from_sidecars(path)
    if side:
        return side
    header, _ = read_header(path)  # a broken file raises the reader's own message
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        metadata = {}
    for field in _METADATA_FIELDS:
        words = _phrases(metadata.get(field)) if metadata.get(field) else []
        if words:
            return TriggerWords(tuple(words), field)
    return _from_kohya(metadata) or TriggerWords((), "")


def stack_trigger_words(specs) -> list[str]:
    """The trigger words of the LoRAs of a stack that are on (strength not 0), in stack order, each once.

    A file whose header cannot be read adds none: applying the stack refuses that file with the reader's
    full message, so it is never skipped silently where it matters.
    """
    out: list[str] = []
    for spec in specs:
        if not spec.enabled or spec.strength == 0:
            continue
        try:
            out += read_trigger_words(spec.path).words
        except (ZImageError, OSError):
            continue
    seen: set[str] = set()
    return [w for w in out if not (w.lower() in seen or seen.add(w.lower()))]


def prompt_with_trigger_words(prompt: str, words) -> str:
    """`prompt` with the trigger words it does not contain yet put in front ("w1, w2, prompt")."""
    low = prompt.lower()
    missing = [w for w in words if w.lower() not in low]
    if not missing:
        return prompt
    head = ", ".join(missing)
    return f"{head}, {prompt}" if prompt.strip() else head

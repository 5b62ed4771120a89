"""One loader for every matcher: ``load_encoder(spec)``.

A spec is one of
- a registered name: a JSON file in ``matcher/model_configs/`` (``offline-teacher`` ...), which
  either points at a checkpoint in ``assets/`` (type ``towers``) or at an open_clip model;
- ``open_clip:MODEL@TAG`` for a hub pretrained tag (validated against ``open_clip.list_pretrained()``),
  ``open_clip:MODEL@PATH`` for a local open_clip checkpoint, ``open_clip:MODEL`` for random init;
- a path to a matcher dual-encoder checkpoint (``.pt``) written by the training commands.

Presets map the dashboard's roles (teacher, student, ...) to specs.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from matcher.encoders import Encoder
from matcher.paths import REPO_ROOT

CONFIG_DIR = REPO_ROOT / "matcher" / "model_configs"

PRESETS: dict[str, dict[str, str]] = {
    # Everything from the repository and PyPI; what tests, CI and the default app run.
    "offline": {"teacher": "offline-teacher", "student": "offline-student", "hashed": "offline-hashed"},
    # The same plus the fine-grained tier as a fourth column (teacher shortlist re-scored region x word).
    "offline+fine": {"teacher": "offline-teacher", "student": "offline-student", "hashed": "offline-hashed",
                     "fine": "offline-fine"},
    # Hub weights (needs internet on first use): what a Hugging Face Space can run.
    "clip": {"teacher": "open_clip:ViT-L-14@dfn2b", "student": "open_clip:MobileCLIP2-S0@dfndr2b"},
}
DEFAULT_PRESET = "offline"


def registered_models() -> dict[str, dict]:
    """Registered model configs by name (file stem)."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(CONFIG_DIR.glob("*.json"))}


def preset(name: str) -> dict[str, str]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def _from_config(name: str, config: dict) -> Encoder:
    kind = config.get("type")
    if kind == "towers":
        from matcher.dual_encoder import load_checkpoint

        return load_checkpoint(REPO_ROOT / config["checkpoint"], name=name)
    if kind == "open_clip":
        from matcher.openclip_encoder import OpenClipEncoder

        return OpenClipEncoder(config["model"], config.get("pretrained"))
    if kind == "hashed":
        # A hashed matcher encodes queries with its base float encoder; the hash heads act on its
        # output (``open_matcher`` builds the two-stage search around it). The base's memoised
        # instance: a preset with student and hashed roles holds one student, not two.
        return cached_encoder(config["base"])
    if kind == "fine-rerank":
        # Likewise: queries are encoded by the base (teacher); the shortlist is re-scored region x word
        # by ``matcher.finegrained.search``.
        return cached_encoder(config["base"])
    raise ValueError(f"model config {name!r} has unknown type {kind!r} "
                     "(expected 'towers', 'open_clip', 'hashed' or 'fine-rerank')")


def load_encoder(spec: str) -> Encoder:
    """Build the encoder a spec names (see module docstring). Raises ``ValueError`` with choices."""
    if spec.startswith("open_clip:"):
        from matcher.openclip_encoder import OpenClipEncoder

        model_name, _, pretrained = spec[len("open_clip:"):].partition("@")
        return OpenClipEncoder(model_name, pretrained or None)
    registry = registered_models()
    if spec in registry:
        return _from_config(spec, registry[spec])
    if spec.endswith(".pt"):
        from matcher.dual_encoder import load_checkpoint

        return load_checkpoint(Path(spec))
    raise ValueError(
        f"unknown model {spec!r}: use a registered name ({', '.join(registry) or 'none'}), "
        "open_clip:MODEL@TAG, open_clip:MODEL@PATH or a .pt checkpoint path"
    )


@lru_cache(maxsize=8)
def cached_encoder(spec: str) -> Encoder:
    """``load_encoder`` memoised per process: the app and the CLI load each model once."""
    return load_encoder(spec)

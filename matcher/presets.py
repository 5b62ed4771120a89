"""Presets: which matcher plays which role (teacher, student, hashed, ...), and what runs when a
preset cannot run here. The CLI, the page and the benches all resolve presets through
``resolve_preset`` and read ``ROLE=SPEC`` lists through ``parse_roles``: one rule, one meaning.

A preset is a JSON file: an object mapping role -> spec (keys starting with ``_`` are notes), e.g.
``{"teacher": "open_clip:ViT-L-14@dfn2b", "student": "open_clip:MobileCLIP2-S0@dfndr2b",
"hashed": "hashed:open_clip:MobileCLIP2-S0@dfndr2b"}``. The built-in ones are the files in
``matcher/models/configs/presets/``; a user's is passed with ``--preset-file F``.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from matcher.paths import PACKAGE_DIR
from matcher.registry import missing_weights, needs_hub, parse_spec

PRESET_DIR = PACKAGE_DIR / "models" / "configs" / "presets"
DEFAULT_PRESET = "offline"


def load_preset_file(path: str | Path) -> dict[str, str]:
    """role -> spec from a preset file; ``ValueError`` naming the file and what is wrong in it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read preset file {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"preset file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"preset file {path} must hold a JSON object mapping role to spec")
    roles = {}
    for role, spec in data.items():
        if role.startswith("_"):
            continue
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"preset file {path}: role {role!r} needs a spec string, got {spec!r}")
        try:
            parse_spec(spec)
        except ValueError as exc:
            raise ValueError(f"preset file {path}: role {role!r}: {exc}") from None
        roles[role] = spec.strip()
    if not roles:
        raise ValueError(f"preset file {path} names no roles")
    return roles


def builtin_presets() -> dict[str, dict[str, str]]:
    """The presets shipped as files, the default first."""
    files = sorted(PRESET_DIR.glob("*.json"), key=lambda p: (p.stem != DEFAULT_PRESET, p.stem))
    return {p.stem: load_preset_file(p) for p in files}


PRESETS: dict[str, dict[str, str]] = builtin_presets()
ROLE_ORDER = ("teacher", "student", "hashed")


def ordered_roles(roles) -> list[str]:
    """teacher | student | hashed first, then any other role in its given order."""
    roles = list(roles)
    return [r for r in ROLE_ORDER if r in roles] + [r for r in roles if r not in ROLE_ORDER]


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the Hugging Face hub can be reached (False at once when offline mode is set)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MATCHER_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class ActivePreset:
    requested: str
    name: str                              # the preset actually in use
    roles: dict[str, str]                  # role -> spec, in display order, only usable roles
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One line for the page: which preset is active and why."""
        roles = ", ".join(f"{r} = `{s}`" for r, s in self.roles.items()) or "no matchers"
        text = f"Active preset: **{self.name}** ({roles})."
        if self.notes:
            text += " " + " ".join(self.notes)
        return text


def resolve_preset(requested: str | None = None, presets: dict[str, dict[str, str]] | None = None,
                   fallback: str = DEFAULT_PRESET, hub_ok: Callable[[], bool] = hub_reachable) -> ActivePreset:
    """The preset to run: ``requested`` if it can run here, else ``fallback``; unusable roles dropped.

    The one rule: a preset that needs the hub falls back when the hub cannot be reached; a role
    whose weights are missing is dropped; each with a note meant for the user.
    """
    presets = PRESETS if presets is None else presets
    requested = requested or (fallback if fallback in presets else next(iter(presets)))
    if requested not in presets:
        raise ValueError(f"unknown preset {requested!r}; choose one of: {', '.join(presets)}")
    notes: list[str] = []
    name = requested
    if any(needs_hub(s) for s in presets[requested].values()) and not hub_ok():
        if requested == fallback or fallback not in presets:
            raise ValueError(f"preset {requested!r} needs the Hugging Face hub, which is not reachable")
        notes.append(f"Preset '{requested}' needs the Hugging Face hub, which is not reachable here, "
                     f"so the '{fallback}' preset is used.")
        name = fallback
    roles: dict[str, str] = {}
    for role in ordered_roles(presets[name]):
        spec = presets[name][role]
        reason = missing_weights(spec)
        if reason:
            notes.append(f"The {role} matcher is not available ({reason}).")
        else:
            roles[role] = spec
    return ActivePreset(requested, name, roles, notes)


def parse_roles(text: str | None, preset: dict[str, str]) -> dict[str, str]:
    """Which matchers to run: a comma list of the preset's roles and/or ``ROLE=SPEC`` additions.

    ``None`` or empty: every role of the preset. ``teacher,student``: those roles of the preset.
    ``candidate=runs/student.pt``: a matcher that is not in the preset (a freshly trained checkpoint,
    a tiny test model), measured and shown next to the preset's. Raises ``ValueError`` with a
    message for the user: an unknown role, a malformed pair, or a spec whose weights are missing.
    """
    if not text or not text.strip():
        return dict(preset)
    roles: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        role, eq, spec = (s.strip() for s in item.partition("="))
        if eq:
            if not role or not spec:
                raise ValueError(f"write a matcher as ROLE=SPEC, e.g. candidate=runs/student.pt (got {item!r})")
            reason = missing_weights(spec)
            if reason:
                raise ValueError(f"matcher {role!r} cannot be loaded: {reason}")
            roles[role] = spec
        elif role in preset:
            roles[role] = preset[role]
        else:
            raise ValueError(f"the preset has no matcher {role!r} (has: {', '.join(preset)}; or name one as ROLE=SPEC)")
    return roles

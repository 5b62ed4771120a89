"""Recipes as files: the shipped recipe of every trained artefact is a JSON file in this folder, and
``load_recipe`` turns a recipe file plus ``key=value`` overrides into the recipe dataclass.

A file is a JSON object of recipe fields; keys starting with ``_`` are notes (``_artefact`` says
what the recipe made). A training record (``<checkpoint>.train.json``) works too: its ``recipe``
is used. Fields a file leaves out take the dataclass default, which is the value the field had
before it existed; the shipped files list every field. Every train command resolves
``--recipe FILE`` and its ``--set key=value`` options through ``load_recipe`` and records the
resolved recipe, every field, next to the checkpoint.
"""
from __future__ import annotations

import json
import typing
from dataclasses import fields
from pathlib import Path
from typing import Iterable, TypeVar

RECIPES_DIR = Path(__file__).parent
R = TypeVar("R")
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


class RecipeError(ValueError):
    """A recipe file or override that does not fit the recipe; the message is one line."""


def recipe_path(name: str | Path) -> Path:
    """``name`` as given when it is a file, else the shipped recipe ``RECIPES_DIR / f"{name}.json"``."""
    path = Path(name)
    shipped = RECIPES_DIR / f"{name}.json"
    return shipped if not path.is_file() and shipped.is_file() else path


def _types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _valid_keys(types: dict[str, type]) -> str:
    return "valid keys: " + ", ".join(f"{name} ({kind.__name__})" for name, kind in types.items())


def _from_json(value, kind: type):
    """A file's value for a field of type ``kind`` (ints are accepted for floats), else None."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _from_text(text: str, kind: type):
    """A ``--set`` value parsed as ``kind``, else None."""
    if kind is bool:
        return _BOOLS.get(text.strip().lower())
    try:
        return kind(text)
    except ValueError:
        return None


def load_recipe(cls: type[R], path: str | Path | None = None, overrides: Iterable[str] = ()) -> R:
    """The recipe ``cls`` from the JSON file ``path`` (None: the dataclass defaults), then each
    ``key=value`` of ``overrides`` in order, the value parsed as the field's type (bool:
    true/false/yes/no/on/off/1/0). Raises ``RecipeError`` naming the valid keys on an unknown key
    or a value of the wrong type."""
    types = _types(cls)
    values = {}
    if path is not None:
        path = recipe_path(path)
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc}") from None
        if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
            data = data["recipe"]  # a training record
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path} is not a JSON object of recipe fields")
        for key, value in data.items():
            if key.startswith("_"):
                continue
            if key not in types:
                raise RecipeError(f"unknown key {key!r} in recipe {path}; {_valid_keys(types)}")
            values[key] = _from_json(value, types[key])
            if values[key] is None:
                raise RecipeError(f"{key} in recipe {path} must be {types[key].__name__}, not {value!r}; "
                                  f"{_valid_keys(types)}")
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            what = f"unknown key {key!r}" if sep else f"{item!r} is not key=value"
            raise RecipeError(f"--set {what}; {_valid_keys(types)}")
        values[key] = _from_text(text, types[key])
        if values[key] is None:
            raise RecipeError(f"--set {item}: {key} must be {types[key].__name__}, not {text!r}; {_valid_keys(types)}")
    return cls(**values)

"""Recipes as files (matcher/train/recipes/): each shipped file is what its artefact was really
trained with, ``--set`` overrides parse by field type and refuse what does not fit, and every train
command defaults to its shipped recipe with a short ``--help``."""
import argparse
import json
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch

from matcher.finegrained.checkpoints import FineRecipe
from matcher.finegrained.cross_train import CrossRecipe, VLCrossRecipe, VLDecompRecipe
from matcher.finegrained.tops_train import TopsRecipe
from matcher.hashing.train import HashRecipe
from matcher.paths import REPO_ROOT
from matcher.train.recipes import RECIPES_DIR, RecipeError, load_recipe
from matcher.train.student import StudentRecipe
from matcher.train.teacher import TeacherRecipe

MODELS = REPO_ROOT / "assets" / "models"


def _train_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _teacher():
    return _train_json(MODELS / "offline-teacher.train.json")["recipe"]


def _student():
    return _train_json(MODELS / "offline-student.train.json")["recipe"]


def _hash():
    from matcher.hashing.heads import load_heads

    meta = load_heads(MODELS / "offline-hashed.pt")[1]
    return {**meta["recipe"], "base": meta["base"], "target": meta["target"],
            "bits": ",".join(str(b) for b in sorted(meta["best_epochs"]))}


def _fine(name: str):
    def recorded():
        record = _train_json(MODELS / "fine" / f"{name}.train.json")
        return {**record["recipe"], "distill_from": record["distill_from"] or ""}
    return recorded


def _cross(name: str):
    def recorded():
        payload = torch.load(MODELS / "fine" / f"{name}.pt", map_location="cpu", weights_only=True)
        decomposed = (MODELS / "fine" / f"{name}-decomposed.pt").exists()
        return {**{k: v for k, v in payload["recipe"].items() if k != "residual_scale"}, "decompose": decomposed}
    return recorded


def _vl(name: str, *context: str):
    def recorded():
        payload = torch.load(MODELS / "fine" / f"{name}.pt", map_location="cpu", weights_only=True)
        return {k: v for k, v in payload["recipe"].items() if k not in context}
    return recorded


# shipped file -> (recipe class, what the artefact's own record says it was trained with)
SHIPPED = {
    "teacher": (TeacherRecipe, _teacher),
    "student": (StudentRecipe, _student),
    "hash": (HashRecipe, _hash),
    **{f"fine-{n}": (FineRecipe, _fine(n)) for n in ("alignment-sum", "alignment-mean", "alignment-mean-drop05",
                                                      "codes-16", "codes-4", "codes-1")},
    **{f"fine-codes-inflate-{m}": (FineRecipe, _fine(f"codes-inflate-{m}")) for m in (16, 8, 4, 2, 1)},
    **{f"fine-codes-tops-{m}": (FineRecipe, _fine(f"codes-tops-{m}")) for m in (16, 4, 1)},
    "cross": (CrossRecipe, _cross("cross")),
    "cross-residual": (CrossRecipe, _cross("cross-residual")),
    "vl-cross": (VLCrossRecipe, _vl("vl-cross", "teacher")),
    "vl-decomposed": (VLDecompRecipe, _vl("vl-decomposed", "cross", "cross_recipe")),
    "tops-alignment": (TopsRecipe, _vl("tops-alignment", "teacher")),
}


def test_every_recipe_file_is_listed():
    assert {p.stem for p in RECIPES_DIR.glob("*.json")} == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipe_is_complete_and_what_its_artefact_was_trained_with(name):
    cls, recorded = SHIPPED[name]
    data = json.loads((RECIPES_DIR / f"{name}.json").read_text())
    assert {k for k in data if not k.startswith("_")} == {f.name for f in fields(cls)}  # every field spelled out
    recipe = asdict(load_recipe(cls, RECIPES_DIR / f"{name}.json"))
    record = recorded()
    # Fields added after the artefact was trained are missing from its record: their defaults are
    # what it trained with (e.g. the fine tiers' loss before InfoNCE existed was the hinge).
    defaults = asdict(cls())
    assert recipe == {**defaults, **record}, name


def test_shipped_student_is_the_documented_command():
    """``train-student --loss listnet --embed-weight 1.0 --image-size 112 --skip-blocks 6,9,12,14
    --cached-blocks 7 --finetune-blocks 7 --tower-lr 3e-4 --epochs 32 --caption-passes 2 --crop-views 4``"""
    command = dict(loss="listnet", embed_weight=1.0, image_size=112, skip_blocks="6,9,12,14", cached_blocks=7,
                   finetune_blocks=7, tower_lr=3e-4, epochs=32, caption_passes=2, crop_views=4)
    assert load_recipe(StudentRecipe, "student") == StudentRecipe(**command)


def test_set_parses_values_by_the_field_type_in_order():
    recipe = load_recipe(StudentRecipe, "student", ["epochs=3", "lr=1e-2", "skip_blocks=6,9", "epochs=4",
                                                    "teacher=runs/t.pt", "embed_weight=0"])
    assert (recipe.epochs, recipe.lr, recipe.skip_blocks, recipe.teacher) == (4, 0.01, "6,9", "runs/t.pt")
    assert type(recipe.embed_weight) is float and recipe.embed_weight == 0.0
    assert recipe.crop_views == 4  # untouched fields keep the file's value
    assert load_recipe(HashRecipe, None, ["calibrate=yes"]).calibrate is True
    assert load_recipe(CrossRecipe, "cross-residual", ["decompose=false", "residual=0"]) == \
        CrossRecipe(**{**asdict(load_recipe(CrossRecipe, "cross-residual")), "decompose": False, "residual": False})


@pytest.mark.parametrize("override, says", [("nope=1", "unknown key 'nope'"), ("epochs=three", "epochs must be int"),
                                            ("lr=fast", "lr must be float"), ("epochs", "is not key=value")])
def test_set_refuses_unknown_keys_and_bad_values_naming_the_valid_keys(override, says):
    with pytest.raises(RecipeError) as error:
        load_recipe(TeacherRecipe, "teacher", [override])
    message = str(error.value)
    assert says in message and "\n" not in message
    assert "valid keys: image_variant (str), image_size (int)" in message and "probe_lr (float)" in message


def test_recipe_files_are_checked_like_overrides(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps({"epochs": "ten"}))
    (tmp_path / "odd.json").write_text(json.dumps({"_note": "notes are fine", "epochs": 2, "lr": 1, "colour": "red"}))
    (tmp_path / "ok.json").write_text(json.dumps({"_note": "partial: the rest are defaults", "epochs": 2, "lr": 1}))
    with pytest.raises(RecipeError, match="epochs in recipe .* must be int"):
        load_recipe(TeacherRecipe, tmp_path / "bad.json")
    with pytest.raises(RecipeError, match="unknown key 'colour'.*valid keys"):
        load_recipe(TeacherRecipe, tmp_path / "odd.json")
    assert load_recipe(TeacherRecipe, tmp_path / "ok.json") == TeacherRecipe(epochs=2, lr=1.0)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(TeacherRecipe, tmp_path / "missing.json")
    # a training record holds the recipe it was trained with: retrain from it
    assert asdict(load_recipe(StudentRecipe, MODELS / "offline-student.train.json")) == _student()


# --- the train commands ------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    from matcher.cli import fine, hashing, train

    parser = argparse.ArgumentParser(prog="python -m matcher")
    sub = parser.add_subparsers(dest="command", required=True)
    for commands in (train, hashing, fine):
        commands.add_commands(sub)
    return parser


COMMANDS = {"train-teacher": (TeacherRecipe, "teacher"), "train-student": (StudentRecipe, "student"),
            "ablate-student": (StudentRecipe, "student"), "train-hash": (HashRecipe, "hash"),
            "train-fine": (FineRecipe, "fine-alignment-sum"), "train-cross": (CrossRecipe, "cross"),
            "train-vl-cross": (VLCrossRecipe, "vl-cross"), "train-vl-decomposed": (VLDecompRecipe, "vl-decomposed"),
            "train-tops-alignment": (TopsRecipe, "tops-alignment")}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_train_commands_default_to_the_shipped_recipe(command):
    from matcher.cli.train import recipe_arg

    cls, shipped = COMMANDS[command]
    assert recipe_arg(cls, _parser().parse_args([command])) == load_recipe(cls, RECIPES_DIR / f"{shipped}.json")
    changed = recipe_arg(cls, _parser().parse_args([command, "--set", "seed=7"]))
    assert changed.seed == 7


def test_train_student_without_options_retrains_the_shipped_student():
    from matcher.cli.train import recipe_arg

    assert asdict(recipe_arg(StudentRecipe, _parser().parse_args(["train-student"]))) == _student()


def test_a_bad_override_is_a_one_line_error_without_traceback():
    from matcher.cli.train import recipe_arg

    with pytest.raises(SystemExit) as exit_:
        recipe_arg(StudentRecipe, _parser().parse_args(["train-student", "--set", "temperature=0.1"]))
    assert str(exit_.value.code).startswith("error: --set unknown key 'temperature'; valid keys: loss (str)")
    assert "\n" not in str(exit_.value.code)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_train_command_help_fits_on_one_screen(command):
    parser = _parser()._subparsers._group_actions[0].choices[command]
    help_text = parser.format_help()
    options = [a for a in parser._actions if a.option_strings]  # --help included
    assert len(options) <= 12 and len(options) == help_text.count("\n  -"), help_text
    assert "--recipe FILE" in help_text and "--set KEY=VALUE" in help_text


def test_train_student_records_the_full_resolved_recipe_next_to_the_checkpoint(tmp_path, monkeypatch):
    import matcher.train.student as student
    from matcher.cli.train import cmd_train_student

    resumes = []

    def fake_train(data, out, recipe, progress=True, resume=None):
        resumes.append(resume)
        return {"recipe": asdict(recipe), "best_epoch": 1, "val": {"rsum": 1.0}, "history": []}

    monkeypatch.setattr(student, "train_student", fake_train)
    out = tmp_path / "student.pt"
    cmd_train_student(_parser().parse_args(["train-student", "--set", "epochs=2", "--out", str(out)]))
    recorded = json.loads(out.with_suffix(".train.json").read_text())["recipe"]
    assert recorded == {**_student(), "epochs": 2}
    assert resumes == [Path("runs") / "student.resume.pt"]  # a killed run resumes when the command is rerun

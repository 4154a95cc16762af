"""recipe.py: YAML and --set parsing, validation where a recipe is read, and the structure keys."""
from __future__ import annotations

import pytest

from bestcompress.errors import RecipeError
from bestcompress.recipe import (
    LIMITS, Recipe, list_recipes, load_recipe, parse_overrides, recipe_from_dict, structure_changes,
)


def one_sentence(e) -> str:
    msg = str(e)
    assert "\n" not in msg and msg.endswith("."), msg
    return msg


def test_every_registered_recipe_is_valid():
    for name in list_recipes():
        recipe = load_recipe(name)
        assert recipe.name and recipe_from_dict(recipe.to_dict()) == recipe


@pytest.mark.parametrize("text,value", [("1e-3", 1e-3), ("5E-4", 5e-4), ("2e2", 200.0), ("0.01", 0.01), ("3", 3.0)])
def test_float_looking_strings_are_numbers(text, value):
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number it looks like."""
    recipe = load_recipe("bestformer", parse_overrides([f"train.lr={text}"]))
    assert recipe.train.lr == value and isinstance(recipe.train.lr, float)


def test_float_strings_in_a_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 1e-3\n  min_lr: 1e-6\n")
    r = load_recipe(path)
    assert (r.train.lr, r.train.min_lr) == (1e-3, 1e-6)


@pytest.mark.parametrize("override,key", [
    ("train.lr=0", "train.lr"), ("train.lr=-1e-3", "train.lr"), ("train.batch_size=0", "train.batch_size"),
    ("train.epochs=0", "train.epochs"), ("train.warmup_epochs=-1", "train.warmup_epochs"),
    ("distill.alpha=1.01", "distill.alpha"), ("distill.alpha=-0.1", "distill.alpha"),
    ("distill.temperature=0", "distill.temperature"), ("distill.label_smoothing=1", "distill.label_smoothing"),
    ("attention.v_threshold=0", "attention.v_threshold"), ("train.lr=.nan", "train.lr"),
    ("train.lr=.inf", "train.lr"), ("train.lr=fast", "train.lr"), ("train.epochs=2.5", "train.epochs"),
])
def test_values_outside_their_range_name_the_key(override, key):
    with pytest.raises(RecipeError, match=key) as e:
        load_recipe("bestformer", parse_overrides([override]))
    one_sentence(e.value)


def test_range_edges_are_allowed():
    r = load_recipe("bestformer", parse_overrides(["distill.alpha=0", "train.warmup_epochs=0", "train.epochs=1",
                                                   "train.batch_size=1"]))
    assert (r.distill.alpha, r.train.warmup_epochs) == (0.0, 0)
    assert load_recipe("bestformer", parse_overrides(["distill.alpha=1"])).distill.alpha == 1.0


def test_every_limit_names_a_real_key():
    plain = Recipe().to_dict()
    for key in LIMITS:
        section, name = key.split(".")
        assert name in plain[section], key


def test_validation_also_applies_to_files_and_dicts(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: 0\n")
    with pytest.raises(RecipeError, match=f"{path}: key 'train.batch_size' must be >= 1"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="distill.alpha"):
        recipe_from_dict({"distill": {"alpha": 3}})


def test_unknown_losses_are_refused():
    with pytest.raises(RecipeError, match="'bogus'"):
        load_recipe("bestformer", parse_overrides(["distill.losses=[hard, bogus]"]))
    assert load_recipe("bestformer", parse_overrides(["distill.losses=[soft, feature]"])).distill.losses == (
        "soft", "feature")


@pytest.mark.parametrize("raw", ["[first", "[first, heads", "{a: 1", "a: b: c"])
def test_overrides_that_are_not_yaml_are_errors(raw):
    with pytest.raises(RecipeError, match="not valid YAML") as e:
        parse_overrides([f"weights.keep_full_precision={raw}"])
    one_sentence(e.value)


def test_list_overrides_parse_as_flow_lists():
    r = load_recipe("bestformer", parse_overrides(["weights.keep_full_precision=[first, 'block.*.attn.*']"]))
    assert r.weights.keep_full_precision == ("first", "block.*.attn.*")


def test_override_syntax_errors():
    with pytest.raises(RecipeError, match="key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(RecipeError, match="unknown key 'train.nope'"):
        load_recipe("bestformer", parse_overrides(["train.nope=1"]))


def test_structure_changes_lists_only_structure_keys():
    built = load_recipe("bestformer")
    asked = load_recipe("bestformer", parse_overrides(["reversible.enabled=false", "attention.map=kv",
                                                        "train.lr=1e-3", "distill.alpha=0.2"]))
    assert sorted(structure_changes(built, asked)) == ["attention.map", "reversible.enabled"]
    assert structure_changes(built.to_dict(), built) == []


def test_stream_bits_is_null_or_an_integer_from_2_to_16():
    assert load_recipe("bestformer").reversible.stream_bits is None
    finn = load_recipe("bestformer_finn")
    assert finn.reversible.stream_bits == 8 and "FINN" in finn.description
    assert finn.replace(**{"reversible.stream_bits": None}).to_dict() == \
        load_recipe("bestformer").replace(**{"description": finn.description, "name": finn.name}).to_dict()
    assert load_recipe("bestformer", {"reversible.stream_bits": 2}).reversible.stream_bits == 2
    for bad in (1, 17, 0, -8):
        with pytest.raises(RecipeError, match="'reversible.stream_bits' must be null"):
            load_recipe("bestformer", {"reversible.stream_bits": bad})
    with pytest.raises(RecipeError, match="must be an integer"):
        load_recipe("bestformer", {"reversible.stream_bits": 8.5})
    msg = one_sentence(pytest.raises(RecipeError, load_recipe, "bestformer_finn",
                                     {"train.memory": "reversible"}).value)
    assert "train.memory" in msg and "stream_bits" in msg

"""Recipe validation: every shipped recipe is valid; mistakes name the key and the line."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from retromae_st.errors import UserInputError
from retromae_st.recipes import bundled_recipe, load_recipe, resolve_output

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

MINIMAL = """\
name: tiny
output_dir: out
model:
  preset: retromae-tiny
  vocab_size: 200
pretrain:
  corpus: corpus.txt
  max_steps: 3
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["quickstart", "debian-pkgs", "retromae-base", "msmarco"])
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.name == name


def test_quickstart_recipe_is_bundled_in_the_package():
    assert load_recipe(bundled_recipe("quickstart")) == load_recipe(RECIPES / "quickstart.yaml")


def test_retromae_base_exports_to_its_name():
    assert load_recipe(RECIPES / "retromae-base.yaml").export == "retromae-base"


def test_unknown_key_names_key_and_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace("  max_steps: 3", "  max_stpes: 3"))
    with pytest.raises(UserInputError, match=r"recipe.yaml:8: unknown key 'pretrain.max_stpes'"):
        load_recipe(path)


def test_wrong_type_names_key_and_line(tmp_path):
    path = write(tmp_path, MINIMAL.replace("max_steps: 3", "max_steps: many"))
    with pytest.raises(UserInputError, match=r"recipe.yaml:8: pretrain.max_steps"):
        load_recipe(path)


def test_out_of_range_value_is_refused(tmp_path):
    text = MINIMAL + "  loss:\n    encoder_mask_ratio: 1.0\n"
    with pytest.raises(UserInputError, match=r"recipe.yaml:10: pretrain.loss.encoder_mask_ratio"):
        load_recipe(write(tmp_path, text))


def test_missing_required_key_and_inconsistent_model(tmp_path):
    with pytest.raises(UserInputError, match="missing required key 'output_dir'"):
        load_recipe(write(tmp_path, MINIMAL.replace("output_dir: out\n", "")))
    both = MINIMAL.replace("  vocab_size: 200", "  name_or_path: bert-base-uncased")
    with pytest.raises(UserInputError, match="exactly one of model.preset"):
        load_recipe(write(tmp_path, both))


def test_missing_recipe_and_invalid_yaml(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserInputError, match="invalid YAML"):
        load_recipe(write(tmp_path, "model: [unclosed\n"))
    with pytest.raises(UserInputError, match="mapping"):
        load_recipe(write(tmp_path, "- a list\n"))


def test_yaml_is_read_safely(tmp_path):
    # A Python-object tag would run code with an unsafe loader; safe loading refuses it.
    path = write(tmp_path, MINIMAL + "evil: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserInputError, match="invalid YAML"):
        load_recipe(path)


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["pretrain.max_steps=7", "pretrain.loss.decoding=basic", "seed=3"])
    assert recipe.pretrain.max_steps == 7 and recipe.pretrain.loss.decoding == "basic" and recipe.seed == 3
    with pytest.raises(UserInputError, match="unknown key 'pretrain.nope'"):
        load_recipe(path, ["pretrain.nope=1"])
    with pytest.raises(UserInputError, match="section.key=value"):
        load_recipe(path, ["pretrain.max_steps"])


def test_output_cannot_escape_the_root(tmp_path):
    assert resolve_output(tmp_path, "runs/a") == (tmp_path / "runs" / "a").resolve()
    for bad in ("../outside", "/etc/x", "runs/../../x", "."):
        with pytest.raises(UserInputError):
            resolve_output(tmp_path, bad)


def test_dump_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    again = write(tmp_path, yaml.safe_dump(recipe.model_dump()))
    assert load_recipe(again) == recipe


# -- YAML aliases and duplicate keys (issue #10, item 8) ----------------------------------------------------


def alias_bomb(levels: int, width: int) -> str:
    """``a: &a [x, ...]``, ``b: &b [*a, ...]``, ...: ``width ** levels`` values from a few hundred bytes."""
    names = "abcdefghijklmnopqrstuvwxyz"
    lines = [f"a: &a [{', '.join(['x'] * width)}]"]
    for previous, name in zip(names, names[1:levels]):
        lines.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_naming_the_line(tmp_path):
    # 10**5 values from 300 bytes: the expansion is refused before anything walks it.
    path = write(tmp_path, MINIMAL + alias_bomb(levels=5, width=10))
    with pytest.raises(
        UserInputError, match=r"recipe.yaml:13: .*more than 100000 values through nested alias"
    ):
        load_recipe(path)


@pytest.mark.parametrize(
    ("text", "line"),
    [("a: &a [*a]\n", 1), ("name: x\nb: &b\n  c: *b\n", 3), ("s: &s [1, [2, *s]]\n", 1)],
)
def test_recursive_alias_is_refused_naming_file_and_line(tmp_path, text, line):
    with pytest.raises(UserInputError, match=rf"recipe.yaml:{line}: the alias \*\w is inside its own anchor"):
        load_recipe(write(tmp_path, text))


def test_too_many_aliases_are_refused(tmp_path):
    text = MINIMAL + "v: &v 1\nmany: [" + ", ".join(["*v"] * 1001) + "]\n"
    with pytest.raises(UserInputError, match=r"recipe.yaml:10: more than 1000 aliases"):
        load_recipe(write(tmp_path, text))
    # A recipe that uses aliases modestly still loads.
    modest = MINIMAL.replace("  max_steps: 3", "  max_steps: &steps 3\n  save_steps: *steps")
    assert load_recipe(write(tmp_path, modest)).pretrain.save_steps == 3


def test_deeply_nested_yaml_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="nested too deeply"):
        load_recipe(write(tmp_path, MINIMAL + "deep: " + "[" * 5000 + "]" * 5000 + "\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (MINIMAL + "  max_steps: 9\n", r"recipe.yaml:9: duplicate key 'max_steps' \(also at line 8\)"),
        (MINIMAL + "name: other\n", r"recipe.yaml:9: duplicate key 'name' \(also at line 1\)"),
        (MINIMAL + "x: {a: 1, a: 2}\n", r"recipe.yaml:9: duplicate key 'a' \(also at line 9\)"),
    ],
)
def test_duplicate_keys_name_both_lines(tmp_path, text, message):
    with pytest.raises(UserInputError, match=message):
        load_recipe(write(tmp_path, text))


def test_merge_keys_may_be_overridden():
    from retromae_st.recipes import _load_yaml

    data, _ = _load_yaml("base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  x: 3\n")
    assert data["other"] == {"x": 3, "y": 2}


def test_override_values_are_loaded_with_the_same_bounds(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(UserInputError, match=r"override 'seed=&a \[\*a\]': the alias \*a is inside"):
        load_recipe(path, ["seed=&a [*a]"])
    with pytest.raises(UserInputError, match=r"override 'seed=\[1': invalid YAML value"):
        load_recipe(path, ["seed=[1"])

"""The shared pieces of the config files: a dataclass declared elsewhere as a table, and the one-line message."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field, ValidationError

from schemas import FieldError
from schemas.config_files import ConfigTable, dataclass_table, describe


@dataclass(frozen=True)
class Recipe:
    servings: int = 2
    salt_grams: float = 1.0
    chef: str = "anyone"

    def __post_init__(self) -> None:
        if self.servings < 1:
            raise ValueError(f"servings: must be >= 1, got {self.servings}")
        if self.salt_grams > 10:
            raise FieldError(f"at most 10 g, got {self.salt_grams}", "salt_grams")


class Kitchen(ConfigTable):
    ovens: int = Field(1, ge=1)
    recipe: Annotated[Recipe, dataclass_table(Recipe, exclude=("chef",))] = Recipe()


def problem(values: dict[str, object]) -> str:
    with pytest.raises(ValidationError) as raised:
        Kitchen.model_validate(values)
    return describe(raised.value, Kitchen, Path("kitchen.toml"))


def test_a_dataclass_table_builds_the_dataclass_with_the_defaults_it_declares() -> None:
    kitchen = Kitchen.model_validate({"recipe": {"salt_grams": 3}})

    assert kitchen.recipe == Recipe(salt_grams=3.0)
    assert Kitchen.model_validate({"recipe": Recipe(servings=4)}).recipe.servings == 4
    assert kitchen.model_dump(mode="json") == {"ovens": 1, "recipe": {"servings": 2, "salt_grams": 3.0}}


@pytest.mark.parametrize(
    ("values", "line"),
    [
        ({"recipe": {"servings": 0}}, "kitchen.toml: recipe.servings = 0: must be >= 1, got 0"),
        ({"recipe": {"salt_grams": 20}}, "kitchen.toml: recipe.salt_grams = 20: at most 10 g, got 20.0"),
        ({"recipe": {"servings": "2"}}, 'kitchen.toml: recipe.servings = "2": must be an integer'),
        (
            {"recipe": {"chef": "me"}},
            'kitchen.toml: recipe.chef = "me": unknown key; allowed here: servings, salt_grams',
        ),
        ({"ovens": 0, "recipe": []}, "kitchen.toml: ovens = 0: must be >= 1; recipe = []: must be a table"),
    ],
    ids=["constructor names the key", "FieldError names the key", "type", "excluded field", "two problems"],
)
def test_every_problem_is_on_one_line_with_its_dotted_key(values: dict[str, object], line: str) -> None:
    assert problem(values) == line


def test_every_option_of_both_files_has_a_description_for_the_reference() -> None:
    """The models are the reference documentation (a generated reference reads their JSON schema)."""
    from coordinator.config import CoordinatorConfig
    from site_agent.config import SiteConfig

    undocumented = []
    for model in (CoordinatorConfig, SiteConfig):
        schema = model.model_json_schema()
        for table_name, table in {model.__name__: schema, **schema.get("$defs", {})}.items():
            if table_name.endswith("Table"):  # a dataclass declared in schemas/ (TrainingConfig), documented there
                continue
            for option, spec in table.get("properties", {}).items():
                if "description" not in spec:
                    undocumented.append(f"{table_name}.{option}")

    assert undocumented == []

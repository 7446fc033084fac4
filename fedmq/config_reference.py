"""``fedmq config-reference``: the reference of every key of coordinator.toml and site.toml, made from the config
models themselves (their JSON schema: defaults, ranges, choices, descriptions), so it cannot drift from the code.

``docs/CONFIG.md`` is this command's output; a unit test fails when it is out of date
(regenerate with ``python3 -m fedmq config-reference > docs/CONFIG.md``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping
from typing import Any

Schema = Mapping[str, Any]

HEADER = """# Configuration reference

Every key of the two config files, with its default, what it may be, and what it does. Generated from the config
models (`coordinator/config.py`, `site_agent/config.py`) by `python3 -m fedmq config-reference`; a test keeps this
file equal to that output. Unknown keys are refused, and a bad value stops the program before it connects with one
line naming the file, the key, the value and what is allowed. Relative paths are relative to the config file.
"""


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "config-reference",
        help="print the reference of every coordinator.toml and site.toml key (Markdown)",
        description="Print the reference of every coordinator.toml and site.toml key, with defaults and ranges.",
    )
    parser.set_defaults(handler=reference_command)


def reference_command(args: argparse.Namespace) -> int:
    print(reference_markdown(), end="")
    return 0


def reference_markdown() -> str:
    from coordinator.config import CoordinatorConfig
    from site_agent.config import SiteConfig

    parts = [HEADER]
    for title, model in (("coordinator.toml", CoordinatorConfig), ("site.toml", SiteConfig)):
        schema = model.model_json_schema()
        parts.append(f"\n## {title}\n")
        parts.extend(_tables(schema, schema, prefix=""))
    return "".join(parts)


def _tables(schema: Schema, node: Schema, *, prefix: str, variant: str = "") -> Iterator[str]:
    """One Markdown table for the plain keys of ``node``, then a section for each nested table."""
    node = _resolve(schema, node)
    heading = f"[{prefix}]" if prefix else "top level"
    plain, nested = [], []
    for key, field in node.get("properties", {}).items():
        resolved = _resolve(schema, field)
        if _is_table(schema, resolved):
            nested.append((key, resolved))
        else:
            plain.append((key, field))
    if plain:
        description = node.get("description", "") if prefix else ""
        yield f"\n### {heading}{variant}\n\n"
        if description:
            yield f"{_one_line(description)}\n\n"
        yield "| key | default | allowed | meaning |\n| --- | --- | --- | --- |\n"
        required = set(node.get("required", ()))
        for key, field in plain:
            yield (
                f"| `{key}` | {_default(field, key in required)} | {_allowed(schema, field)} | "
                f"{_one_line(field.get('description', ''))} |\n"
            )
    for key, resolved in nested:
        path = f"{prefix}.{key}" if prefix else key
        variants = resolved.get("oneOf") or resolved.get("anyOf")
        if variants:
            for option in variants:
                option_schema = _resolve(schema, option)
                chosen = _discriminator(option_schema)
                yield from _tables(schema, option_schema, prefix=path, variant=f" ({chosen})" if chosen else "")
        else:
            yield from _tables(schema, resolved, prefix=path)


def _resolve(schema: Schema, node: Schema) -> Schema:
    reference = node.get("$ref")
    if reference:
        return dict(schema["$defs"][reference.rsplit("/", 1)[-1]])
    return node


def _is_table(schema: Schema, node: Schema) -> bool:
    if node.get("type") == "object" and "properties" in node:
        return True
    variants = node.get("oneOf") or node.get("anyOf") or []
    return bool(variants) and all(_resolve(schema, option).get("type") == "object" for option in variants)


def _discriminator(node: Schema) -> str:
    for key, field in node.get("properties", {}).items():
        if "const" in field:
            return f"{key} = {json.dumps(field['const'])}"
    return ""


def _default(field: Schema, required: bool) -> str:
    if "default" not in field:
        return "required" if required else "empty"
    return f"`{json.dumps(field['default'])}`"


def _allowed(schema: Schema, field: Schema) -> str:
    field = _resolve(schema, field)
    if "const" in field:
        return f"`{json.dumps(field['const'])}`"
    if "enum" in field:
        return " \\| ".join(f"`{json.dumps(value)}`" for value in field["enum"])
    variants = field.get("anyOf") or field.get("oneOf")
    if variants:
        return " or ".join(_allowed(schema, option) for option in variants)
    kind = {"integer": "integer", "number": "number", "string": "string", "boolean": "true/false", "null": "unset"}
    text = str(kind.get(field.get("type", ""), field.get("type", "table")))
    if field.get("type") == "array":
        text = "list of " + _allowed(schema, field.get("items", {}))
    bounds = []
    for name, sign in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if name in field:
            bounds.append(f"{sign} {field[name]}")
    if "minLength" in field:
        bounds.append("non-empty")
    if "pattern" in field:
        bounds.append(f"matching `{field['pattern']}`")
    return text + (f" ({', '.join(bounds)})" if bounds else "")


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("``", "`").replace("|", "\\|")


if __name__ == "__main__":
    print(reference_markdown(), end="")

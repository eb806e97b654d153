"""Extract, from OpenAI's OpenAPI description, the response schemas of the routes maxjax serves.

Dev-only: tests/test_openai_schema.py validates every body and stream event the server sends against the file this
writes; the full description (about 3 MB of YAML, 1,400 schemas for the whole API) is not kept in the repository.

    curl -L https://raw.githubusercontent.com/openai/openai-openapi/<commit>/openapi.yaml -o /tmp/openapi.yaml
    python scripts/extract_openai_schemas.py /tmp/openapi.yaml --commit <commit>

Writes tests/fixtures/openai-openapi/openai-schemas.json: the description's `openapi` and `info`, where it came from
(`x-source`: repository, commit, file), the `paths` of `ROUTES` cut down to their responses' schemas, and every
component schema those reference, plus `EXTRA_ROOTS`, transitively. Schemas are kept as written (`nullable` and
all) except that documentation-only keywords (`example`, `examples`, `x-oaiMeta`) are dropped; `$ref`s still point
at `#/components/schemas/<name>`, so the file is a valid OpenAPI document of its own. A `.json` input (the repository
ships `openapi.json` beside the YAML, with the same content) works too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "openai-openapi" / "openai-schemas.json"
REPO = "openai/openai-openapi"

ROUTES = {
    "/chat/completions": ["post"],
    "/completions": ["post"],
    "/embeddings": ["post"],
    "/models": ["get"],
    "/models/{model}": ["get"],
    "/responses": ["post"],
    "/responses/{response_id}": ["get", "delete"],
}
"""The routes (as the description spells them, without `/v1`) and methods whose responses we keep."""

EXTRA_ROOTS = ["ErrorResponse"]
"""Schemas our bodies are checked against that no kept route's responses name (the error body)."""

DOC_ONLY = {"example", "examples", "x-oaiMeta"}
SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
"""Keywords whose value maps names to schemas: their keys are property names, never keywords."""
SCHEMA_LISTS = {"allOf", "anyOf", "oneOf", "prefixItems"}
SCHEMA_VALUES = {"items", "additionalProperties", "unevaluatedProperties", "not", "if", "then", "else", "contains",
                 "propertyNames", "additionalItems", "unevaluatedItems"}  # fmt: skip


def load(path: Path) -> dict[str, Any]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    import yaml  # only for the YAML form; a dependency of maxjax's dependencies

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a safe loader


def clean(schema: Any) -> Any:
    """A schema without its documentation-only keywords (walking only into places that hold schemas)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DOC_ONLY:
            continue
        if key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: clean(sub) for name, sub in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            out[key] = [clean(sub) for sub in value]
        elif key in SCHEMA_VALUES:
            out[key] = clean(value)
        else:
            out[key] = value
    return out


def refs(value: Any) -> set[str]:
    """The component schema names `value` refers to anywhere inside it."""
    found: set[str] = set()
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                found.add(ref.rsplit("/", 1)[1])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def route_responses(spec: dict[str, Any]) -> dict[str, Any]:
    """`ROUTES`, each operation cut down to `responses -> status -> content -> media type -> schema`."""
    paths: dict[str, Any] = {}
    for route, methods in ROUTES.items():
        for method in methods:
            operation = spec["paths"][route][method]
            responses = {
                status: {"content": {media: {"schema": body["schema"]} for media, body in answer.get("content", {}).items()
                                     if "schema" in body}}
                for status, answer in operation["responses"].items()
            }  # fmt: skip
            paths.setdefault(route, {})[method] = {"operationId": operation.get("operationId"), "responses": responses}
    return paths


def extract(spec: dict[str, Any], commit: str, source: str) -> dict[str, Any]:
    schemas = spec["components"]["schemas"]
    paths = route_responses(spec)
    todo = sorted(refs(paths) | set(EXTRA_ROOTS))
    kept: dict[str, Any] = {}
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept[name] = clean(schemas[name])
        todo.extend(refs(kept[name]) - kept.keys())
    return {
        "openapi": spec["openapi"],
        "info": {"title": spec["info"]["title"], "version": spec["info"]["version"]},
        "x-source": {"repository": f"https://github.com/{REPO}", "commit": commit, "file": source},
        "paths": paths,
        "components": {"schemas": dict(sorted(kept.items()))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", type=Path, help="openapi.yaml (or openapi.json) from openai/openai-openapi")
    parser.add_argument("--commit", required=True, help="the commit of openai/openai-openapi it was taken from")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    doc = extract(load(args.spec), args.commit, args.spec.name)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(f"{args.out}: {len(doc['components']['schemas'])} schemas, OpenAPI {doc['openapi']}, "
          f"info.version {doc['info']['version']}, {args.out.stat().st_size:,} bytes")  # fmt: skip


if __name__ == "__main__":
    main()

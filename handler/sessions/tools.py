"""Checking a tool call the model wrote against the session's tool definitions.

Tools use OpenAI's function shape, ``{"type": "function", "function": {"name",
"description", "parameters": <JSON Schema>}}``; arguments are validated with
``jsonschema`` against the declared ``parameters``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema
from jsonschema.validators import validator_for


class ToolCallError(ValueError):
    """The model called an unknown tool or wrote arguments its schema rejects."""


def checked_arguments(
    name: str, arguments: str, tools: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The parsed arguments of a call to tool ``name``.

    Args:
        name: the function name the model called.
        arguments: the arguments as the model wrote them (JSON text).
        tools: the session's tool definitions (OpenAI function shape).

    Raises:
        ToolCallError: no such tool, arguments not a JSON object, or rejected by its schema
            (the message names the failing path).
    """
    function = next(
        (t["function"] for t in tools if t.get("function", {}).get("name") == name), None
    )
    if function is None:
        raise ToolCallError(f"the model called unknown tool {name!r}")
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as error:
        raise ToolCallError(f"arguments of {name!r} are not JSON: {error.msg}") from error
    if not isinstance(parsed, dict):
        raise ToolCallError(f"arguments of {name!r} must be a JSON object")
    schema = function.get("parameters") or {"type": "object"}
    # The draft the schema names ($schema), as when the session was created; else 2020-12.
    validator = validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    rejected = jsonschema.exceptions.best_match(validator.iter_errors(parsed))
    if rejected is not None:
        path = "/".join(str(p) for p in rejected.absolute_path) or "(root)"
        raise ToolCallError(f"arguments of {name!r} at {path}: {rejected.message}")
    return parsed

r"""Checking a tool call the model wrote against the session's tool definitions.

Tools use OpenAI's function shape, ``{"type": "function", "function": {"name",
"description", "parameters": <JSON Schema>}}``; arguments are validated against
the declared ``parameters``.

The check runs on the event loop, between a reply's model output and its
``tool.call``, so it must take bounded time whatever the client's schema and
the model's arguments: arguments over :data:`MAX_ARGUMENTS_CHARS` are refused
unread, and validation is ``jsonschema_rs`` with the Rust ``regex`` engine for
``pattern`` and ``patternProperties`` (and the keywords that consult them),
which matches in time linear in the text, like RE2. Python's ``re``, which
``jsonschema`` calls for those keywords and cannot be swapped for another
engine there, backtracks: ``"^(a+)+$"`` against 34 ``a`` and a ``!`` takes
minutes, and the whole process with it. The draft is the one ``jsonschema``
picks from ``$schema`` (2020-12 when it names none), as at session creation.

Differences from ``jsonschema`` and Python's ``re`` (JSON Schema patterns are
ECMA-262 regular expressions): no lookaround and no backreferences (the
linear-time engine has none; such a schema is refused at session creation),
``\d`` and ``\w`` match ASCII only (as in ECMA-262; ``re`` matches any
Unicode digit or letter), ``$ref`` resolves within the schema only (no
retrieval), draft 3 schemas are refused, and ``format`` is not asserted
(as before).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jsonschema
import jsonschema_rs
from jsonschema.validators import validator_for

# Longest arguments (JSON text, characters) that are parsed and validated. A reply
# writes at most 64 tokens (handler/sessions/runner.py), so real calls are far shorter.
MAX_ARGUMENTS_CHARS = 16_384
# jsonschema's validator class for each draft -> jsonschema_rs's.
_DRAFTS: dict[type, Any] = {
    jsonschema.Draft4Validator: jsonschema_rs.Draft4Validator,
    jsonschema.Draft6Validator: jsonschema_rs.Draft6Validator,
    jsonschema.Draft7Validator: jsonschema_rs.Draft7Validator,
    jsonschema.Draft201909Validator: jsonschema_rs.Draft201909Validator,
    jsonschema.Draft202012Validator: jsonschema_rs.Draft202012Validator,
}


class ToolCallError(ValueError):
    """The model called an unknown tool or wrote arguments its schema rejects."""


class ToolSchemaError(ValueError):
    """A tool's ``parameters`` schema that arguments cannot be checked against.

    Args:
        path: where in the schema (keys and indices), e.g. ``["properties", "q", "pattern"]``.
        message: what is wrong there.
    """

    def __init__(self, path: list[str | int], message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


def arguments_validator(schema: Mapping[str, Any]) -> Any:
    """The compiled validator of a tool's arguments (``jsonschema_rs``, linear-time patterns).

    Compiled validators of recent schemas are kept, so a session's calls do
    not compile its schema again.

    Args:
        schema: the tool's ``parameters``, already checked against its metaschema.

    Raises:
        ToolSchemaError: a pattern the linear-time engine does not take (lookaround,
            backreferences, a compiled size over the engine's limit), a ``$ref`` that
            does not resolve within the schema, or a draft 3 schema.
    """
    return _compiled(json.dumps(schema, sort_keys=True))


@functools.lru_cache(maxsize=64)
def _compiled(schema_text: str) -> Any:
    schema = json.loads(schema_text)
    draft = validator_for(schema, default=jsonschema.Draft202012Validator)
    compiled = _DRAFTS.get(draft)
    if compiled is None:
        raise ToolSchemaError(["$schema"], f"{schema.get('$schema')!r} is not supported; name "
                              "draft 4, 6, 7, 2019-09 or 2020-12, or none (2020-12)")
    try:
        return compiled(schema, validate_formats=False, offline=True,
                        pattern_options=jsonschema_rs.RegexOptions())
    except jsonschema_rs.ValidationError as error:
        message = error.message
        if isinstance(error.kind, jsonschema_rs.ValidationErrorKind.Format):  # "format": "regex"
            message = (f"pattern {error.instance!r} is not supported: patterns are matched in "
                       "linear time, without lookaround or backreferences")
        raise ToolSchemaError(list(error.instance_path), message) from error


def checked_arguments(
    name: str, arguments: str, tools: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """The parsed arguments of a call to tool ``name``.

    Args:
        name: the function name the model called.
        arguments: the arguments as the model wrote them (JSON text).
        tools: the session's tool definitions (OpenAI function shape).

    Raises:
        ToolCallError: no such tool, arguments over :data:`MAX_ARGUMENTS_CHARS` or not a
            JSON object, rejected by its schema (the message names the failing path),
            or a schema they cannot be checked against (a session created before
            such schemas were refused).
    """
    function = next(
        (t["function"] for t in tools if t.get("function", {}).get("name") == name), None
    )
    if function is None:
        raise ToolCallError(f"the model called unknown tool {name!r}")
    if len(arguments) > MAX_ARGUMENTS_CHARS:
        raise ToolCallError(f"arguments of {name!r} are {len(arguments)} characters; at most "
                            f"{MAX_ARGUMENTS_CHARS} are checked")
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as error:
        raise ToolCallError(f"arguments of {name!r} are not JSON: {error.msg}") from error
    except RecursionError as error:
        raise ToolCallError(f"arguments of {name!r} are nested too deeply") from error
    if not isinstance(parsed, dict):
        raise ToolCallError(f"arguments of {name!r} must be a JSON object")
    try:
        validator = arguments_validator(function.get("parameters") or {"type": "object"})
    except ToolSchemaError as error:
        raise ToolCallError(f"the parameters schema of {name!r} cannot be used: {error}") from error
    rejected = next(validator.iter_errors(parsed), None)
    if rejected is not None:
        path = "/".join(str(p) for p in rejected.instance_path) or "(root)"
        raise ToolCallError(f"arguments of {name!r} at {path}: {rejected.message}")
    return parsed

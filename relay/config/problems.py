"""Config problems in the admin's words: the key path (``apps[0].tenant_id``), pydantic's errors
rewritten as what is wrong and how to fix it, "did you mean" for an unknown key."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from relay.errors import ConfigError


class KeyedError(ValueError):
    """A cross-reference problem that knows which key it is about."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(problem)


def key_path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def config_error(exc: ValidationError, file: str, root: type[BaseModel]) -> ConfigError:
    """All of a validation's problems (at most ``MAX_PROBLEMS``) as one ConfigError, one line each."""
    errors = exc.errors()
    # An entry that failed also makes its list look empty or its section invalid ("Tuple should
    # have at least 1 item"): that echo of the real problem is dropped, the real problem stays.
    locs = [tuple(err["loc"]) for err in errors]
    errors = [err for err, loc in zip(errors, locs, strict=True)
              if not any(len(other) > len(loc) and other[:len(loc)] == loc for other in locs)]
    problems = list(dict.fromkeys(describe(err, root) for err in errors))
    key, problem = problems[0]
    for other_key, other_problem in problems[1:MAX_PROBLEMS]:
        problem += f"\n{file}: {other_key}: {other_problem}"
    if len(problems) > MAX_PROBLEMS:
        problem += f"\n{file}: ... and {len(problems) - MAX_PROBLEMS} more problem(s)"
    return ConfigError(file, key, problem)


def suggest(loc: tuple[str | int, ...], root: type[BaseModel]) -> str:
    """'did you mean ...' for an unknown key, from the keys the model allows."""
    model: Any = root
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        candidates = [ann, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            for c in args:
                inner = getattr(c, "__origin__", None)
                if inner is not None:
                    for a in getattr(c, "__args__", ()):
                        if isinstance(a, type) and issubclass(a, BaseModel):
                            model = a
    if model is None:
        return ""
    match = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean {match[0]!r}?)" if match else f" (allowed: {', '.join(model.model_fields)})"


#: problems listed in one error; the rest are counted.
MAX_PROBLEMS = 10

#: pydantic's wording -> the admin's, by error type (the rest keep their message, minus "Value error, ").
PLAIN_PROBLEMS = {
    "string_type": "expected text",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "tuple_type": "expected a list, e.g. [a, b] or one '- item' per line",
    "list_type": "expected a list, e.g. [a, b] or one '- item' per line",
    "dict_type": "expected a mapping of keys (key: value), not a single value",
    "model_type": "expected a mapping of keys (key: value), not a single value",
    "model_attributes_type": "expected a mapping of keys (key: value), not a single value",
    "path_type": "expected a file or directory path",
}


def describe(err: Any, root: type[BaseModel]) -> tuple[str, str]:
    """One pydantic error -> (key path, what is wrong and how to fix it)."""
    loc = tuple(err["loc"])
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, KeyedError):
        return inner.key, inner.problem
    key = key_path(loc)
    if err["type"] == "extra_forbidden":
        return key, "unknown key" + suggest(loc, root)
    if err["type"] == "missing":
        return key, "required key is missing"
    if err["type"] in PLAIN_PROBLEMS:
        return key, PLAIN_PROBLEMS[err["type"]]
    ctx = err.get("ctx") or {}
    if err["type"] == "too_short":
        n = ctx.get("min_length", 1)
        return key, f"needs at least {n} {'entry' if n == 1 else 'entries'}"
    bounds = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "more than"),
              "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}
    if err["type"] in bounds and bounds[err["type"]][0] in ctx:
        name, words = bounds[err["type"]]
        return key, f"expected a number {words} {ctx[name]}"
    if err["type"] in ("enum", "literal_error") and "expected" in ctx:
        return key, f"expected one of {ctx['expected']}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    return key, msg.replace("Input should be", "expected").replace("input should be", "expected")


"""Reading a configuration file: YAML in, a validated ``schema.Document`` out.

``${VAR}`` in string values is replaced from the environment (``$${`` is a literal ``${``);
secret fields keep their reference, resolved at apply time. Every problem is reported at once as
``<file>: <path>: <what is wrong> (line N)``, e.g.
``chittycan.yaml: models[2].prices[0].input: must be a decimal string such as "2.50" (line 31)``.
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Any

import yaml
from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from control.config.schema import ConfigError, Document, Path, check_references, format_path

__all__ = ["load_file", "load_text"]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _line_map(text: str) -> dict[Path, int]:
    """Path in the document -> 1-based line where its value starts."""
    lines: dict[Path, int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: Path) -> None:
        lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    lines[(*path, key.value)] = key.start_mark.line + 1
                    walk(value, (*path, key.value))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    if root is not None:
        walk(root, ())
    return lines


_SECRET_PATHS = (("providers", int, "api_key"), ("tenants", int, "budgets", int, "webhook_secret"))


def _is_secret_path(path: Path) -> bool:
    for pattern in _SECRET_PATHS:
        if len(pattern) == len(path) and all(
            (isinstance(p, int) if want is int else p == want) for want, p in zip(pattern, path, strict=True)
        ):
            return True
    return False


def _interpolate(data: Any, path: Path, env: dict[str, str], errors: list[tuple[Path, str]]) -> Any:
    """``${VAR}`` in string values, from ``env``; secret fields are resolved later, at apply time."""
    if isinstance(data, dict):
        return {k: _interpolate(v, (*path, k), env, errors) for k, v in data.items()}
    if isinstance(data, list):
        return [_interpolate(v, (*path, i), env, errors) for i, v in enumerate(data)]
    if isinstance(data, str) and "${" in data and not _is_secret_path(path):

        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                errors.append((path, f"environment variable {name} is not set"))
                return ""
            return env[name]

        return _ENV_REF.sub(sub, data.replace("$${", "\x00")).replace("\x00", "${")
    return data


_FRIENDLY = {
    "missing": "is required",
    "string_type": "must be a string",
    "int_type": "must be an integer",
    "float_type": "must be a number",
    "bool_type": "must be true or false",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}


def _pydantic_message(err: Any) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind in _FRIENDLY:
        return _FRIENDLY[kind]
    if kind == "literal_error":
        return f"must be one of: {ctx.get('expected', '').replace(chr(39), '')}"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"is longer than {ctx.get('max_length')} characters"
    return str(err["msg"])


def _known_fields(path: Path) -> list[str]:
    spec: type[BaseModel] = Document
    for part in path:
        if isinstance(part, int):
            continue
        info = spec.model_fields.get(part)
        if info is None:
            return []
        inner = _spec_of(info.annotation)
        if inner is None:
            return []
        spec = inner
    return list(spec.model_fields)


def _spec_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _spec_of(arg)
        if found is not None:
            return found
    return None


def load_text(text: str, *, filename: str = "chittycan.yaml", env: dict[str, str] | None = None) -> Document:
    """Parse and validate a configuration; raise ConfigError listing every problem."""
    env = dict(os.environ) if env is None else env

    def fail(problems: list[tuple[Path, str]], lines: dict[Path, int]) -> ConfigError:
        out = []
        for path, message in problems:
            line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
            suffix = f" (line {line})" if line else ""
            out.append(f"{filename}: {format_path(path)}: {message}{suffix}")
        return ConfigError(out)

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{filename}: not valid YAML: {problem}{where}"]) from None
    lines = _line_map(text)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise fail([((), "must be a mapping with providers, models, plans and tenants")], lines)
    problems: list[tuple[Path, str]] = []
    data = _interpolate(data, (), env, problems)
    if problems:
        raise fail(problems, lines)
    try:
        doc = Document.model_validate(data)
    except PydanticValidationError as exc:
        for err in exc.errors():
            path: Path = tuple(p for p in err["loc"] if isinstance(p, str | int))
            message = _pydantic_message(err)
            if err["type"] == "extra_forbidden" and path:
                known = _known_fields(path[:-1])
                close = difflib.get_close_matches(str(path[-1]), known, n=1)
                message = "unknown field" + (f" (did you mean {close[0]}?)" if close else "")
                if known:
                    message += f"; allowed: {', '.join(known)}"
            problems.append((path, message))
        raise fail(problems, lines) from None
    problems = check_references(doc)
    if problems:
        raise fail(problems, lines)
    return doc


def load_file(path: str, *, env: dict[str, str] | None = None) -> Document:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    return load_text(text, filename=path, env=env)

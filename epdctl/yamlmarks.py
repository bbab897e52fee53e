"""YAML → plain Python values, keeping the line of every key and value.

PyYAML's `safe_load` forgets where things came from and lets a duplicate key silently win.
Topology errors must name `FILE:LINE`, so we walk the composed node tree ourselves.
Values also get compose-style `${VAR:-default}` expansion here, because only here do we
still know whether a scalar was plain (and should be re-typed after expansion) or quoted.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

from epdctl.errors import EXIT_USAGE, EpdctlError

Path_ = tuple  # a path into the document: keys and list indices


@dataclass
class Marks:
    """Line numbers (1-based) of each path's value and, for mapping entries, its key."""

    value_lines: dict[Path_, int] = field(default_factory=dict)
    key_lines: dict[Path_, int] = field(default_factory=dict)

    def line_for(self, path: Path_, prefer_key: bool = False) -> int:
        """The line of the deepest known prefix of `path`."""
        path = tuple(path)
        while True:
            if prefer_key and path in self.key_lines:
                return self.key_lines[path]
            if path in self.value_lines:
                return self.value_lines[path]
            if path in self.key_lines:
                return self.key_lines[path]
            if not path:
                return 1
            path = path[:-1]


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<invalid>\{[^}]*\}?))"
)


def expand_vars(text: str, environ: Mapping[str, str]) -> str:
    """Expand `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?msg}`, `$$`.

    Unlike compose, an unset variable with no default is an error rather than "", because
    an empty model path or port is never what the user meant.
    Raises ValueError with a message suitable for a topology error.
    """

    def replace(match: re.Match) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("invalid") is not None:
            raise ValueError(f"bad variable reference ${match.group('invalid')}")
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        value = environ.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if not unset:
            return value
        if op in ("-", ":-"):
            return expand_vars(arg, environ)
        if op in ("?", ":?"):
            raise ValueError(f"${{{name}}} is not set: {arg or 'required'}")
        raise ValueError(f"${{{name}}} is not set (give a default with ${{{name}:-value}})")

    return _VAR.sub(replace, text)


def load_marked(text: str, filename: str, environ: Mapping[str, str] | None = None) -> tuple[Any, Marks]:
    """Parse one YAML document. Errors are `EpdctlError`s reading `FILE:LINE: ...`."""
    environ = os.environ if environ is None else environ
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = exc.problem or exc.context or "invalid YAML"
        raise EpdctlError(f"{filename}:{line}: invalid YAML: {problem}", EXIT_USAGE) from None
    except yaml.YAMLError as exc:
        raise EpdctlError(f"{filename}:1: invalid YAML: {exc}", EXIT_USAGE) from None
    finally:
        loader.dispose()
    if node is None:
        raise EpdctlError(f"{filename}:1: the file is empty", EXIT_USAGE)
    marks = Marks()
    value = _walk(node, (), marks, loader, filename, environ)
    return value, marks


def _walk(node, path, marks: Marks, loader, filename, environ):
    marks.value_lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves `<<:` merge keys as safe_load would
        result: dict = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise EpdctlError(f"{filename}:{line}: {_dotted(path) or '<top>'}: keys must be plain strings", EXIT_USAGE)
            key = loader.construct_object(key_node)
            if not isinstance(key, str):
                key = str(key)
            if key in result:
                first = marks.key_lines[path + (key,)]
                raise EpdctlError(
                    f"{filename}:{line}: {_dotted(path + (key,))}: duplicate key (first set on line {first})",
                    EXIT_USAGE,
                )
            marks.key_lines[path + (key,)] = line
            result[key] = _walk(value_node, path + (key,), marks, loader, filename, environ)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_walk(child, path + (i,), marks, loader, filename, environ) for i, child in enumerate(node.value)]
    value = loader.construct_object(node)
    if isinstance(value, str) and "$" in value:
        try:
            expanded = expand_vars(value, environ)
        except ValueError as exc:
            raise EpdctlError(f"{filename}:{node.start_mark.line + 1}: {_dotted(path)}: {exc}", EXIT_USAGE) from None
        if node.style is None:
            # A plain scalar is typed after substitution, as compose does: `port: ${P:-8000}` is an int.
            try:
                retyped = yaml.safe_load(expanded)
            except yaml.YAMLError:
                retyped = expanded
            value = retyped if isinstance(retyped, (str, int, float, bool)) or retyped is None else expanded
        else:
            value = expanded
    return value


def _dotted(path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


dotted = _dotted

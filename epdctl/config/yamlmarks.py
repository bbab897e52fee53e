"""YAML files → plain Python values, keeping the line of every key and value; and the
`FILE:LINE: field: message` report of what a pydantic model then refuses in them.

PyYAML's `safe_load` forgets where things came from and lets a duplicate key silently win.
Topology errors must name `FILE:LINE`, so we walk the composed node tree ourselves.
Values also get compose-style `${VAR:-default}` expansion here, because only here do we
still know whether a scalar was plain (and should be re-typed after expansion) or quoted.

The file is not trusted to be small once parsed (docs/design.md, Trust and limits): a few aliases
can name a tree of billions of nodes, and PyYAML composes recursively. So the loader counts, while
composing, what a walk of the tree would visit with every alias expanded, and stops past a budget.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, get_args

import yaml
from pydantic import BaseModel, ValidationError

from epdctl.errors import EXIT_USAGE, EpdctlError

Path_ = tuple  # a path into the document: keys and list indices

MAX_FILE_BYTES = 1024 * 1024

# Real topologies have a few hundred values, nest 5 or 6 levels and hold a few KB of text.
MAX_NODES = 10_000
MAX_DEPTH = 64
MAX_CHARS = 4 * 1024 * 1024
# YAML 1.1 reads `1:2:3` as a base-60 number, in time quadratic in its length.
MAX_NUMBER_CHARS = 100

MERGE_TAG = "tag:yaml.org,2002:merge"
STR_TAG = "tag:yaml.org,2002:str"
NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
SCALAR_TAGS = (STR_TAG, *NUMBER_TAGS, "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null")
# A bare `=` and a date: no field takes either as such, so they stay the text that was written.
TEXT_TAGS = ("tag:yaml.org,2002:value", "tag:yaml.org,2002:timestamp")
_LINE_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # what PyYAML counts as a new line


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


def one_line(text: str) -> str:
    """`text` with newlines and control characters escaped.

    File names, keys and values come from the user; escaped, an error stays one line and a
    terminal shows it as written.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def error_line(filename: str, line: int, message: str) -> str:
    """One `FILE:LINE: message` line."""
    return one_line(f"{filename}:{line}: {message}")


def dotted(path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


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


# ---------------------------------------------------------------- bounded composing


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that refuses alias bombs, recursive aliases and deep nesting while composing.

    An alias costs what it names: the nodes, text and height of its anchor's subtree, which
    is complete (and measured) before any alias to it can be read.
    """

    def __init__(self, text: str):
        super().__init__(text)
        self._depth = 0
        self._deepest = 0  # the deepest level reached, aliases expanded, in the node being composed
        self._nodes = 0
        self._chars = 0
        self._extents: dict[str, tuple[int, int, int]] = {}  # anchor → (nodes, chars, height)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            self._charge_alias(event)
            return super().compose_node(parent, index)
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _composer_error(f"nested deeper than {MAX_DEPTH} levels", event.start_mark)
        nodes_before, chars_before = self._nodes, self._chars
        outer_deepest, self._deepest = self._deepest, self._depth
        self._charge(1, len(event.value) if isinstance(event, yaml.ScalarEvent) else 0, event.start_mark)
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            height = self._deepest - self._depth + 1
            self._extents[event.anchor] = (self._nodes - nodes_before, self._chars - chars_before, height)
        self._deepest = max(outer_deepest, self._deepest)
        self._depth -= 1
        return node

    def _charge_alias(self, event: yaml.AliasEvent) -> None:
        extent = self._extents.get(event.anchor)
        if extent is None:
            if event.anchor in self.anchors:  # registered but still being composed: it contains itself
                raise _composer_error(f"alias *{event.anchor} is inside its own anchor (a recursive structure)", event.start_mark)
            return  # an undefined alias: PyYAML reports it
        nodes, chars, height = extent
        if self._depth + height > MAX_DEPTH:
            raise _composer_error(f"nested deeper than {MAX_DEPTH} levels once alias *{event.anchor} is expanded", event.start_mark)
        self._deepest = max(self._deepest, self._depth + height)
        self._charge(nodes, chars, event.start_mark)

    def _charge(self, nodes: int, chars: int, mark) -> None:
        self._nodes += nodes
        self._chars += chars
        if self._nodes > MAX_NODES:
            raise _composer_error(f"more than {MAX_NODES} values once aliases are expanded", mark)
        if self._chars > MAX_CHARS:
            raise _composer_error(f"more than {MAX_CHARS // (1024 * 1024)} MiB of text once aliases are expanded", mark)


def _composer_error(problem: str, mark) -> yaml.composer.ComposerError:
    return yaml.composer.ComposerError(None, None, problem, mark)


# ---------------------------------------------------------------- loading


def load_marked(text: str, filename: str, environ: Mapping[str, str] | None = None) -> tuple[Any, Marks]:
    """Parse one YAML document. Errors are `EpdctlError`s reading `FILE:LINE: ...`."""
    environ = os.environ if environ is None else environ
    try:
        loader = _BoundedLoader(text)  # the reader refuses control characters here
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, filename) from None
    try:
        node = loader.get_single_node()
        if node is None:
            raise EpdctlError(error_line(filename, 1, "the file is empty"), EXIT_USAGE)
        marks = Marks()
        value = _Walker(loader, filename, environ, marks).walk(node, ())
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, filename) from None
    finally:
        loader.dispose()
    return value, marks


def _yaml_error(exc: yaml.YAMLError, text: str, filename: str) -> EpdctlError:
    if isinstance(exc, yaml.reader.ReaderError):
        line = len(_LINE_BREAK.findall(text, 0, exc.position)) + 1
        problem = f"character U+{exc.character:04X} is not allowed in a YAML file"
    elif isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = (exc.problem or exc.context or "invalid YAML") + _unquoted_variable_hint(exc, text)
    else:
        line, problem = 1, str(exc)
    return EpdctlError(error_line(filename, line, f"invalid YAML: {problem}"), EXIT_USAGE)


def _unquoted_variable_hint(exc: yaml.MarkedYAMLError, text: str) -> str:
    """In a flow collection `{` is syntax, so an unquoted `${VAR}` there is a parse error."""
    mark = exc.problem_mark
    if mark is None or text[mark.pointer - 1:mark.pointer + 1] != "${":
        return ""
    return "; inside {...} or [...] quote a variable: '${VAR:-default}'"


class _Walker:
    """Composed nodes → plain values, recording each path's lines in `marks`."""

    def __init__(self, loader: yaml.SafeLoader, filename: str, environ: Mapping[str, str], marks: Marks):
        self.loader = loader
        self.filename = filename
        self.environ = environ
        self.marks = marks

    def walk(self, node: yaml.Node, path: Path_) -> Any:
        self.marks.value_lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(child, path + (i,)) for i, child in enumerate(node.value)]
        return self.scalar(node, path)

    def mapping(self, node: yaml.MappingNode, path: Path_) -> dict:
        result = self.merged(node, path)  # the mapping's own keys replace what `<<:` brought in
        own_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key = "<<" if key_node.tag == MERGE_TAG else self.key(key_node, path)
            if key in own_lines:
                raise self.error(key_node, path + (key,), f"duplicate key (first set on line {own_lines[key]})")
            own_lines[key] = line
            if key_node.tag == MERGE_TAG:
                continue
            self.marks.key_lines[path + (key,)] = line
            result[key] = self.walk(value_node, path + (key,))
        return result

    def merged(self, node: yaml.MappingNode, path: Path_) -> dict:
        """What `<<: *base` (or `<<: [*a, *b]`, where `a` wins) brings into a mapping."""
        result: dict = {}
        for key_node, value_node in node.value:
            if key_node.tag != MERGE_TAG:
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in reversed(sources):
                if not isinstance(source, yaml.MappingNode):
                    raise self.error(source, path + ("<<",), "a merge key takes a mapping or a list of mappings")
                result.update(self.mapping(source, path))
        return result

    def key(self, node: yaml.Node, path: Path_) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, path, "keys must be plain strings")
        key = self.construct(node, path)
        return key if isinstance(key, str) else str(key)

    def scalar(self, node: yaml.ScalarNode, path: Path_) -> Any:
        value = self.construct(node, path)
        if not (isinstance(value, str) and "$" in value):
            return value
        try:
            expanded = expand_vars(value, self.environ)
        except ValueError as exc:
            raise self.error(node, path, str(exc)) from None
        if node.style is not None:
            return expanded
        # A plain scalar is typed after substitution, as compose does: `port: ${P:-8000}` is an int.
        text = expanded.strip()
        tag = self.loader.resolve(yaml.ScalarNode, text, (True, False))
        if tag == STR_TAG or tag not in SCALAR_TAGS:
            return expanded
        return self.construct(yaml.ScalarNode(tag, text, node.start_mark, node.end_mark), path)

    def construct(self, node: yaml.ScalarNode, path: Path_) -> Any:
        """A scalar as text, number, bool or None: what an argv word or JSON can carry."""
        if node.tag in TEXT_TAGS:
            return node.value
        if node.tag not in SCALAR_TAGS:  # `!!binary`, `!!set x`, `!!python/...`
            raise self.error(node, path, f"the tag {node.tag} is not supported here")
        if node.tag in NUMBER_TAGS and len(node.value) > MAX_NUMBER_CHARS:
            raise self.error(node, path, f"a number of more than {MAX_NUMBER_CHARS} characters")
        try:
            return self.loader.construct_object(node)
        except (ValueError, KeyError, IndexError, OverflowError):  # an explicit tag on the wrong text: `!!int abc`
            raise self.error(node, path, f"{node.value!r} is not a valid {node.tag.rsplit(':', 1)[-1]}") from None

    def error(self, node: yaml.Node, path: Path_, message: str) -> EpdctlError:
        where = dotted(path) or "<top>"
        return EpdctlError(error_line(self.filename, node.start_mark.line + 1, f"{where}: {message}"), EXIT_USAGE)


# ---------------------------------------------------------------- reading a file, reporting its errors


def read_text_file(path: Path, what: str = "topology file") -> str:
    """The file's text. Only a regular file is read: a FIFO or a device would block or never end."""
    where = one_line(str(path))
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise EpdctlError(f"{where}: no such file", EXIT_USAGE) from None
    except OSError as exc:
        raise EpdctlError(f"{where}: cannot read: {exc.strerror}", EXIT_USAGE) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise EpdctlError(f"{where}: is a directory, not a {what}", EXIT_USAGE)
        if not stat.S_ISREG(mode):
            raise EpdctlError(f"{where}: is not a regular file (a FIFO, socket or device?)", EXIT_USAGE)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        data = handle.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise EpdctlError(f"{where}: is larger than {MAX_FILE_BYTES // 1024} KiB: not a {what}", EXIT_USAGE)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise EpdctlError(error_line(str(path), line, f"cannot read: not UTF-8 text (byte 0x{data[exc.start]:02x})"), EXIT_USAGE) from None


def format_validation(exc: ValidationError, filename: str, marks: Marks, root: type[BaseModel]) -> str:
    """One `FILE:LINE: field: message` line per error of `root.model_validate`."""
    lines = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        kind = error["type"]
        if kind == "extra_forbidden":
            message = "unknown key" + did_you_mean(str(loc[-1]), _keys_at(root, loc[:-1]))
            line = marks.line_for(loc, prefer_key=True)
        elif kind == "missing":
            message = "required but missing"
            line = marks.line_for(loc[:-1])
        else:
            message = error["msg"]
            if message.startswith("Value error, "):
                message = message[len("Value error, "):]
            if "input" in error and not isinstance(error["input"], (dict, list)):
                message += f" (got {_shortened(repr(error['input']))})"
            line = marks.line_for(loc)
        lines.append((line, error_line(filename, line, f"{dotted(loc) or '<top>'}: {message}")))
    return "\n".join(dict.fromkeys(text for _, text in sorted(lines, key=lambda entry: entry[0])))


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean X?)` for the choice closest to a misspelt `word`, as compose and cargo say it; else ""."""
    match = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {match[0]}?)" if match else ""


def _keys_at(root: type[BaseModel], path: tuple) -> list[str]:
    """The keys the model allows where `path` (an error's location, less the key) leads."""
    model: Optional[type[BaseModel]] = root
    for part in path:
        if model is None:
            return []
        if isinstance(part, str) and part in model.model_fields:
            model = _model_in(model.model_fields[part].annotation)
        # else a list index or a mapping's key (`fits.encode`): the items are of the same model
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The model a field holds, through Optional, tuple[...] and dict[...]; None for plain values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_model_in, get_args(annotation))), None)


def _shortened(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

"""The user's own text files (member and search-space YAML, a study's results.csv, prompts), read strictly.

UTF-8 only, and in YAML every key once: PyYAML keeps the last of two equal keys without a word, so a
member file with `grid:` twice would quietly sweep half of what it says. Every refusal is one line that
starts with the file's path and says what to do.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from nanosweep.config import ConfigError


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that gives one key twice, and reading 1e-4 as the number it is
    (YAML 1.1, PyYAML's, wants a dot in a float: `learning_rate: 1e-4` would be the string '1e-4')."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` may be overridden on purpose; unhashable keys are PyYAML's to refuse
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


UniqueKeyLoader.add_implicit_resolver(  # only this loader's resolvers change, not PyYAML's own
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_text(path: Path, error: type[ConfigError] = ConfigError) -> str:
    """The file's text (a byte-order mark dropped); `error` when it cannot be read or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror}): give a readable file") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        bad = exc.object[exc.start]
        raise error(f"{path}: line {line} holds byte 0x{bad:02x}, which is not UTF-8: save the file as UTF-8") from None


def read_yaml(path: Path, error: type[ConfigError] = ConfigError) -> Any:
    """The file's YAML document; `error` when it is unreadable, not UTF-8, not YAML, or gives a key twice."""
    text = read_text(path, error)
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or exc
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        raise error(f"{path}: not valid YAML ({problem}{where})") from None

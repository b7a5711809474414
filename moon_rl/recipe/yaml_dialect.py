"""YAML dialect of recipes: YAML 1.2 floats (`1e-4`) and booleans (true/false only), duplicate keys rejected.

PyYAML implements YAML 1.1, where `1e-4` is a string and `no` is False (which would turn TRL's `save_strategy: no`
into a boolean). Recipes are read with `RecipeLoader` and written with `RecipeDumper`.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

import yaml

_FLOAT_TAG = "tag:yaml.org,2002:float"
_BOOL_TAG = "tag:yaml.org,2002:bool"
# YAML 1.2 floats: PyYAML's YAML 1.1 resolver needs a dot, so `1e-4` would be the string "1e-4".
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# YAML 1.1 also reads yes/no/on/off as booleans, which turns TRL's `save_strategy: no` into False.
_BOOL_RE = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and booleans, failing on duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark
                )
            if isinstance(key, Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class RecipeDumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings our loader would read as floats (e.g. the string "1e-4")."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_FLOAT_TAG, _BOOL_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))
RecipeLoader.add_implicit_resolver(_BOOL_TAG, _BOOL_RE, list("tTfF"))
# The dumper keeps YAML 1.1's resolvers too, so it quotes "no" and "1e-4" alike: any reader gets strings back.
RecipeDumper.add_implicit_resolver(_FLOAT_TAG, _FLOAT_RE, list("-+0123456789."))

"""Reading the YAML that users hand us (recipes, study files) with a bound on what its anchors expand to."""

from __future__ import annotations

from typing import Any

import yaml

MAX_YAML_NODES = 100_000  # a recipe has a few hundred; anchors that expand past this are refused


def read_yaml(text: str, what: str) -> Any:
    """`yaml.safe_load`, refusing a document whose anchors and aliases expand to more than MAX_YAML_NODES
    nodes ("billion laughs": nine anchors of nine aliases each are 9^9 nodes once walked, which the merge of
    overrides and the validation would do). The size is counted on the composed graph, before anything is
    built: an alias is the node it names, so the count is the expanded size, computed once per node."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise ValueError(
                f"{what}: its anchors and aliases expand to {size} YAML nodes, more than {MAX_YAML_NODES}: "
                "refused (write the values out)"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = 1  # an anchor inside itself (a cycle) counts once
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size

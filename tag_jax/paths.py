"""Slash-separated pytree paths (`params/h_0/attn/kernel`) and the nested dicts they name."""
from __future__ import annotations

from typing import Mapping, TypeVar

V = TypeVar("V")


def nest(flat: Mapping[str, V]) -> dict:
    """{"a/b": x, "a/c": y} -> {"a": {"b": x, "c": y}}."""
    root: dict = {}
    for path, value in flat.items():
        *head, last = path.split("/")
        node = root
        for word in head:
            node = node.setdefault(word, {})
        node[last] = value
    return root

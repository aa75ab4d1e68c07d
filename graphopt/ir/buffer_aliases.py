"""Buffers also held by plain Python objects (a key/value cache object), rebound on every call.

A module may register a tensor as a buffer *and* keep it in a helper object that does the work:
transformers' static-cache export wrapper registers each layer's key and value tensors as
buffers while its ``StaticCache`` layers write into the very same tensors. Non-strict
``torch.export`` swaps a module's buffers for traced values during capture, but it cannot see the
helper's references: the cache writes would land in untraced constants and the state would be
lost. :func:`bind_buffer_aliases` finds such references and installs a forward pre-hook that
points them at the module's current buffers on every call, so the writes reach the buffers the
graph tracks as state.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["bind_buffer_aliases"]

_MAX_DEPTH = 4


def _buffer_owners(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    owners: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                owners.setdefault(id(buffer), (module, name))
    return owners


def _walk(value: Any, owners: dict[int, tuple[nn.Module, str]], found: list[tuple[Any, str, nn.Module, str]],
          seen: set[int], depth: int) -> None:
    """Collect ``(holder, attribute, module, buffer)`` for attributes of plain objects under ``value``."""
    if depth < 0 or id(value) in seen or isinstance(value, (nn.Module, torch.Tensor, type, str, bytes, int, float)):
        return
    seen.add(id(value))
    if isinstance(value, (list, tuple)):
        for item in value:
            _walk(item, owners, found, seen, depth - 1)
        return
    if isinstance(value, dict):
        for item in value.values():
            _walk(item, owners, found, seen, depth - 1)
        return
    attributes = getattr(value, "__dict__", None)
    if not isinstance(attributes, dict):
        return
    for name, item in list(attributes.items()):
        if isinstance(item, torch.Tensor) and id(item) in owners:
            found.append((value, name, *owners[id(item)]))
        else:
            _walk(item, owners, found, seen, depth - 1)


def bind_buffer_aliases(model: nn.Module) -> int:
    """Keep plain objects inside ``model`` pointing at its buffers on every call; returns how many references.

    Modifies ``model`` (a forward pre-hook): call it on graphopt's own copy, never the user's model.
    """
    owners = _buffer_owners(model)
    if not owners:
        return 0
    found: list[tuple[Any, str, nn.Module, str]] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, value in vars(module).items():
            if name in ("_buffers", "_parameters", "_modules") or name.startswith("_forward"):
                continue
            _walk(value, owners, found, seen, _MAX_DEPTH)
    if not found:
        return 0

    def rebind(module: nn.Module, args: Any) -> None:
        for holder, attribute, owner, buffer_name in found:
            setattr(holder, attribute, getattr(owner, buffer_name))

    model.register_forward_pre_hook(rebind)
    return len(found)

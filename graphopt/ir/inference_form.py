"""The inference form of a captured graph, without a second trace: grad-mode regions inlined, ``.to()`` as copies.

torch.export's training IR keeps two things its inference IR (``run_decompositions``) removes:
a ``torch.no_grad()`` block as a ``wrap_with_set_grad_enabled`` call of a sub-graph (transformers'
rotary embeddings compute their angles in one), and ``x.to(...)`` calls, which either return ``x``
itself or copy it. Passes and targets match the inference form (an angle chain starting at
``_to_copy``, cos/sin in the main graph). :func:`to_inference_form` gives that form by rewriting the
graph in place; ``run_decompositions`` re-traces every op with symbolic shapes (15 s on a
30-layer decoder step), which graphopt's capture needs only when it must functionalize.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from graphopt.ir.op_args import argument

__all__ = ["inline_grad_mode_regions", "to_as_copies", "to_inference_form", "to_returns_input"]

aten = torch.ops.aten


def to_inference_form(gm: fx.GraphModule) -> None:
    """Inline grad-mode regions and rewrite ``.to()`` calls as ``_to_copy`` (or drop them), in place."""
    inline_grad_mode_regions(gm)
    to_as_copies(gm)
    gm.graph.lint()
    gm.recompile()


def inline_grad_mode_regions(gm: fx.GraphModule) -> int:
    """Replace each ``wrap_with_set_grad_enabled(mode, sub_graph, *args)`` by the sub-graph's nodes; how many.

    Grad mode changes nothing an inference graph computes. A sub-graph that reads attributes of
    its own (nested regions, say) is left as it is.
    """
    wrap = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    inlined = 0
    for node in list(gm.graph.nodes):
        if wrap is None or node.op != "call_function" or node.target is not wrap:
            continue
        region = getattr(gm, node.args[1].target, None) if isinstance(node.args[1], fx.Node) else None
        if not isinstance(region, fx.GraphModule) or any(n.op == "get_attr" for n in region.graph.nodes):
            continue
        placeholders = [n for n in region.graph.nodes if n.op == "placeholder"]
        env: dict[fx.Node, fx.Node] = dict(zip(placeholders, node.args[2:], strict=True))
        outputs: tuple[fx.Node, ...] = ()
        with gm.graph.inserting_before(node):
            for inner in region.graph.nodes:
                if inner.op == "output":
                    outputs = tuple(fx.map_arg(inner.args[0], env.__getitem__))
                elif inner.op != "placeholder":
                    env[inner] = gm.graph.node_copy(inner, env.__getitem__)
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise AssertionError(f"unexpected reader {user.format_node()} of a grad-mode region")
            user.replace_all_uses_with(outputs[user.args[1]])
            gm.graph.erase_node(user)
        region_node = node.args[1]
        gm.graph.erase_node(node)
        if not region_node.users:
            gm.graph.erase_node(region_node)
            delattr(gm, region_node.target)
        inlined += 1
    return inlined


def _is_to(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "overloadpacket", None) is aten.to


def to_returns_input(node: fx.Node) -> bool:
    """True for ``x.to(...)`` that returns ``x`` itself: no conversion, no copy or memory format asked."""
    if not _is_to(node) or not isinstance(node.args[0], fx.Node):
        return False
    out, source = node.meta.get("val"), node.args[0].meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(source, torch.Tensor):
        return False
    if argument(node, "copy", False) or argument(node, "memory_format") not in (None, torch.preserve_format):
        return False
    return (out.dtype, out.device, out.layout) == (source.dtype, source.device, source.layout)


def to_as_copies(gm: fx.GraphModule) -> int:
    """Each ``x.to(...)``: dropped when it returns ``x`` itself, else ``_to_copy``; how many were rewritten.

    Only for graphs where nothing writes into the result afterwards (a functional graph): a
    dropped ``.to()`` makes its readers read ``x``.
    """
    rewritten = 0
    for node in list(gm.graph.nodes):
        out = node.meta.get("val")
        if not _is_to(node) or not isinstance(out, torch.Tensor) or not isinstance(node.args[0], fx.Node):
            continue
        if to_returns_input(node) and not any(user.op == "output" for user in node.users):
            node.replace_all_uses_with(node.args[0])  # (an output stays a tensor of its own)
            gm.graph.erase_node(node)
        else:  # rewritten in place: the node keeps its name (an exported program's signature names its outputs)
            kwargs = {"dtype": out.dtype, "layout": out.layout, "device": out.device}
            memory_format = argument(node, "memory_format")
            if memory_format is not None:
                kwargs["memory_format"] = memory_format
            node.target, node.args, node.kwargs = aten._to_copy.default, (node.args[0],), kwargs
        rewritten += 1
    return rewritten

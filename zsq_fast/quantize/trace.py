"""What one forward pass with hooks tells us about a model (no torch.fx needed).

- the order in which modules run (first call), so layers and blocks are reconstructed in data-flow order;
- which Conv2d/Linear output each BatchNorm reads (the tensor object itself), so BN folding pairs
  exactly the layers that feed a BN, whatever the attribute names are; a BN whose layer's output has
  another reader (seen in the autograd graph) is not folded (it would change that reader's input);
- which Conv2d/Linear layers read the same tensor object (a block input feeding conv1 and the downsample):
  an integer accelerator holds that tensor once, on one grid, so they share one input quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_FOLDABLE = (nn.Conv2d, nn.Linear)


def layer_level_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """named_modules() without the modules inside a Conv2d/Linear: a layer's own children (a "same" padding
    conv's ZeroPad2d) are part of its op, and the quantized layer replaces them."""
    out, layers = [], []
    for name, m in model.named_modules():
        if any(name.startswith(p + ".") for p in layers):
            continue
        out.append((name, m))
        if name and isinstance(m, _FOLDABLE):
            layers.append(name)
    return out


@dataclass
class Trace:
    order: list[str] = field(default_factory=list)             # module names by first call
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv/linear name, bn name)
    orphan_bns: list[str] = field(default_factory=list)         # BNs not reading a conv/linear output
    calls: dict[str, int] = field(default_factory=dict)
    shared_inputs: list[list[str]] = field(default_factory=list)  # layers reading one tensor (>= 2, call order)


@torch.no_grad()
def trace_model(model: nn.Module, example: torch.Tensor) -> Trace:
    tr = Trace()
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id(output) -> (layer name, output kept alive)
    readers: dict[int, tuple[torch.Tensor, list[str]]] = {}  # id(input) -> (input kept alive, layers reading it)
    handles = []

    def pre_hook(name):
        def hook(mod, args):
            tr.calls[name] = tr.calls.get(name, 0) + 1
            if tr.calls[name] == 1:
                tr.order.append(name)
            if isinstance(mod, _FOLDABLE) and args and isinstance(args[0], torch.Tensor) and tr.calls[name] == 1:
                entry = readers.setdefault(id(args[0]), (args[0], []))
                entry[1].append(name)
            if type(mod) in _BN and args:  # exact: library subclasses are rewritten first (canonical.py)
                src = produced.get(id(args[0]))
                src = src[0] if src is not None and src[1] is args[0] else None
                pair = next((p for p in tr.bn_pairs if p[1] == name), None)
                if src is None or (pair is not None and pair[0] != src):
                    if name not in tr.orphan_bns:  # not fed by a layer, or shared by several layers
                        tr.orphan_bns.append(name)
                elif pair is None:
                    tr.bn_pairs.append((src, name))
        return hook

    def post_hook(name):
        def hook(mod, args, out):
            if isinstance(out, torch.Tensor):
                produced[id(out)] = (name, out)
        return hook

    for name, mod in layer_level_modules(model):
        if name:
            handles.append(mod.register_forward_pre_hook(pre_hook(name)))
            if isinstance(mod, _FOLDABLE):
                handles.append(mod.register_forward_hook(post_hook(name)))
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    tr.shared_inputs = [names for _, names in readers.values() if len(names) > 1]
    shared = _outputs_read_twice(model, example, {layer for layer, _ in tr.bn_pairs})
    tr.orphan_bns += [bn for layer, bn in tr.bn_pairs if layer in shared]
    tr.bn_pairs = [p for p in tr.bn_pairs if p[0] not in shared]
    return tr


def _outputs_read_twice(model: nn.Module, example: torch.Tensor, layers: set[str]) -> set[str]:
    """The `layers` whose output has another reader besides their BN (x = conv(x); y = bn(x) + x in a
    pre-activation ResNet's stem): folding the BN would change what the other reader sees. Functional readers
    are invisible to hooks but not to autograd: count the graph nodes that consume the layer's output node."""
    nodes: dict[str, object] = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: nodes.setdefault(n, out.grad_fn) and None) for n in layers]
    try:
        with torch.enable_grad():
            y = model(example.detach().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    uses: dict[object, int] = {}
    seen, stack = set(), [y.grad_fn] if isinstance(y, torch.Tensor) and y.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                uses[nxt] = uses.get(nxt, 0) + 1
                stack.append(nxt)
    return {n for n, node in nodes.items() if node is not None and uses.get(node, 0) > 1}

"""Where an integer accelerator holds a tensor on an integer grid: the activation sites of the `hw` preset.

Every op of an integer kernel library writes its output on an integer grid (requantization), so every
tensor that passes between ops is quantized once, by its producer, whoever reads it. Without torch.fx we
see module boundaries; one traced forward pass (BN already folded) tells, by tensor identity:
- the sites: modules whose output gets a quantizer. Every compute leaf that runs (Conv2d/Linear,
  activation and pooling modules, any other parameter-free module such as a shortcut's pad) -- except a
  Conv2d/Linear whose output only an activation module reads (the activation is fused into the
  requantization, as integer kernels do) and the module producing the network output (the output
  quantizer does it) -- and every residual block whose output is a new tensor (the residual add, when no
  activation module follows it in the block; a block returning its last ReLU module's output is quantized
  by that ReLU's site, not a second time). A leaf output changed in place by a functional op before a
  module reads it (`out += identity`) is an add operand: it is a site, and so is the sum;
- for each Conv2d/Linear whose input is a site's output (through pass-through modules: Identity, Dropout,
  Flatten, folded BN), that site: the layer reads the tensor already on the grid and uses the site's
  quantizer as its input quantizer (one quantizer per tensor) instead of quantizing again. A layer that
  reads a reshaped view of it (torch.flatten of a pooled tensor) applies that same quantizer again: the
  values do not change (they are on its grid), and the exported graph's Gemm reads a DequantizeLinear.
A module called more than once (torchvision's BasicBlock applies one ReLU module twice) has one site
quantizer for all its calls. Functional ops (F.relu, +, torch.flatten) are invisible: their results are
quantized where a module or a layer reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU,
               nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish)
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d)
_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass
class Sites:
    sites: list[str] = field(default_factory=list)        # module names, in call order
    fed_by: dict[str, str] = field(default_factory=dict)  # layer name -> the site whose output it reads
    input_readers: list[str] = field(default_factory=list)  # layers reading the network input itself
    via_view: set[str] = field(default_factory=set)  # fed_by layers that read a reshaped view of the site output
    block_outputs: dict[str, str] = field(default_factory=dict)  # block -> the site that quantizes its output


def only(found: Sites, names) -> Sites:
    """The sites among `names` (e.g. those quantizing the block outputs), with the layers they feed."""
    keep = set(names)
    fed = {k: v for k, v in found.fed_by.items() if v in keep}
    return Sites([n for n in found.sites if n in keep], fed, list(found.input_readers),
                 {n for n in found.via_view if n in fed},
                 {b: s for b, s in found.block_outputs.items() if s in keep})


class SiteHook:
    """Forward hook that quantizes a module's output (an object, so deepcopy maps it to the copied quantizer)."""

    def __init__(self, quantizer: nn.Module):
        self.quantizer = quantizer

    def __call__(self, module, args, out):
        return self.quantizer(out) if isinstance(out, torch.Tensor) else out


def attach(model: nn.Module, quantizers: dict[str, nn.Module]) -> None:
    """Register a SiteHook per site (name -> Quantizer) on `model`'s modules."""
    for name, q in quantizers.items():
        model.get_submodule(name).register_forward_hook(SiteHook(q))


def _is_leaf(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is None


@torch.no_grad()
def find_sites(model: nn.Module, example: torch.Tensor, blocks: list[str], layers: list[str]) -> Sites:
    """The sites of `model` (BN folded, eval mode) for one forward pass of `example` (see the module docstring).

    blocks: names of the residual blocks (reconstruction units); layers: the Conv2d/Linear being quantized."""
    keep: list[torch.Tensor] = []                          # keeps every seen tensor alive (ids stay unique)
    producer: dict[int, str | None] = {}                   # id(tensor) -> module that made it
    readers: dict[int, list[str]] = {}                     # id(tensor) -> leaf modules that read it
    inputs: dict[str, torch.Tensor] = {}                   # layer -> its input, first call
    outputs: dict[str, int] = {}                           # module -> id(its output), first call
    all_outputs: dict[str, set[int]] = {}                  # module -> id(its output) of every call
    order: list[str] = []
    version: dict[int, int] = {}                           # id(tensor) -> its version when it was made
    changed: set[int] = set()                              # tensors modified in place (out += identity) before a read
    inplace_leaves: set[str] = set()                       # leaves whose output a functional op changed in place
    handles = []
    block_set, layer_set = set(blocks), set(layers)
    # composite modules (not containers, not the model itself) whose output may be made by a functional op
    composites = {n for n, m in model.named_modules()
                  if n and not _is_leaf(m) and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))}

    def pre(name, mod):
        def hook(m, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return
            keep.append(args[0])
            if id(args[0]) in version and args[0]._version != version[id(args[0])]:
                changed.add(id(args[0]))  # a functional op (an in-place add) read it first
                return
            if _is_leaf(mod):
                readers.setdefault(id(args[0]), []).append(name)
            if name in layer_set:
                inputs.setdefault(name, args[0])
        return hook

    def post(name, mod):
        def hook(m, args, out):
            if not isinstance(out, torch.Tensor):
                return
            keep.append(out)
            version.setdefault(id(out), out._version)
            all_outputs.setdefault(name, set()).add(id(out))
            if name not in outputs:
                outputs[name] = id(out)
                order.append(name)
            if isinstance(mod, PASS_THROUGH):
                src = id(args[0]) if args and isinstance(args[0], torch.Tensor) else None
                producer[id(out)] = producer.get(src) if src is not None else None
            elif _is_leaf(mod) or name in block_set or name in composites:
                made = producer.get(id(out))
                if made is not None and not _is_leaf(mod) and version.get(id(out)) == out._version:
                    return  # the block returns a module's output as is (its last ReLU): that module made it
                if made is not None and version.get(id(out)) != out._version:
                    # a block returning a leaf's output after an in-place add (result += x): that leaf's
                    # output is an add operand and gets its own site; the block's output is a new value
                    changed.add(id(out))
                    inplace_leaves.add(made)
                producer[id(out)] = name
        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_pre_hook(pre(name, mod)))
            handles.append(mod.register_forward_hook(post(name, mod)))
    try:
        y = model(example)
    finally:
        for h in handles:
            h.remove()
    mods = dict(model.named_modules())
    out_id = id(y)
    sites: list[str] = []
    leaf_sites: set[int] = set()
    for name in order:
        mod = mods[name]
        oid = outputs[name]
        if name in inplace_leaves:  # its output object became the block's (new) output: both are sites
            sites.append(name)
            continue
        if producer.get(oid) != name or oid == out_id:
            continue  # a pass-through, a module whose output another module re-made, or the network output
        if name in block_set:
            continue  # decided below, after the leaves
        if isinstance(mod, _LAYERS):
            # a folded BN is an Identity: it returns the same tensor object, so the activation reads it too
            rd = [mods[r] for r in readers.get(oid, []) if not isinstance(mods[r], PASS_THROUGH)]
            if rd and oid not in changed and all(isinstance(r, ACTIVATIONS) for r in rd):
                continue  # fused: the activation's output is the site
        sites.append(name)
        leaf_sites.add(oid)
    # blocks, and any other composite module whose output a functional op made (F.relu(x, inplace=True) in
    # GoogLeNet's BasicConv2d): its output is a new tensor that other ops read
    for name in [b for b in order if b in block_set or b in composites]:
        oid = outputs.get(name)
        if oid is not None and oid != out_id and producer.get(oid) == name and oid not in leaf_sites:
            sites.append(name)
    rank = {n: i for i, n in enumerate(order)}
    sites.sort(key=lambda n: rank[n])
    site_set = set(sites)
    # a layer reads a site's output directly, or a view of it (torch.flatten of a pooled tensor)
    site_storage = {}
    for t in keep:
        name = producer.get(id(t))
        if name in site_set and outputs.get(name) == id(t):
            site_storage[(t.untyped_storage().data_ptr(), t.numel())] = name
    ex_key = (example.untyped_storage().data_ptr(), example.numel())
    readers_of_input = [n for n, x in inputs.items()
                        if x is example or (x.untyped_storage().data_ptr(), x.numel()) == ex_key]
    fed_by, via_view = {}, set()
    for layer, x in inputs.items():
        if id(x) in changed:
            continue
        src = producer.get(id(x))
        if src not in site_set:
            src = site_storage.get((x.untyped_storage().data_ptr(), x.numel()))
        if src in site_set:
            fed_by[layer] = src
            if id(x) not in all_outputs.get(src, ()):  # through nn.Flatten or torch.flatten: another object
                via_view.add(layer)
    block_out = {b: producer.get(outputs[b]) for b in blocks
                 if b in outputs and producer.get(outputs[b]) in site_set}
    return Sites(sites, fed_by, readers_of_input, via_view, block_out)

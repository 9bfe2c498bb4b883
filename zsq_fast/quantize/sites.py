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
A module called more than once (torchvision's BasicBlock applies one ReLU module after bn1 and again after
the residual add) makes a different tensor at each call: each call is a site of its own, named
"layer1.0.relu" (call 0, the plain name, as older checkpoints have it), "layer1.0.relu@1", ... (site_name,
parse_site). The hook counts the calls; the module that makes them (its caller: the innermost module running,
seen in the trace) resets the count in a forward pre-hook, so a block reconstructed alone, a cached-input
pass stopped half way or an ONNX trace all start at call 0. That needs one caller, called once per forward,
making every call; otherwise (calls spread over several callers or over several calls of the caller), and
for Conv2d/Linear layers and blocks (reconstructed alone, without their caller), the module keeps one site
quantizer for all its calls, recorded as "shared_calls" in quant_config. Functional ops (+, torch.flatten)
are invisible to module hooks: their results are quantized where a module or a layer reads them. One is
seen (a TorchFunctionMode over the trace): a functional ReLU (F.relu, torch.relu, Tensor.relu, in place or
not) that is the only reader of a site's output. The ReLU is then fused into that site, as an integer
kernel fuses it into the requantization: the site's grid is unsigned (a grid starting at 0 clamps exactly
as the ReLU does, so the ReLU changes nothing after it) and the layers reading the ReLU's output use the
site's quantizer (Sites.relu_fused); otherwise the site would be quantized signed and the ReLU's output a
second time, unsigned, by each layer reading it. Sites.fused_act names, for a layer run once whose output one
activation module call alone reads, that activation's site: BRECQ reconstructs the pair as one unit.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import FileFormatError, UnsupportedModelError
from .trace import layer_level_modules

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU,
               nn.Sigmoid, nn.Tanh, nn.ELU, nn.Mish)
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d)
_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass
class Sites:
    sites: list[str] = field(default_factory=list)        # site names (site_name), in call order
    fed_by: dict[str, str] = field(default_factory=dict)  # layer name -> the site whose output it reads
    input_readers: list[str] = field(default_factory=list)  # layers reading the network input itself
    via_view: set[str] = field(default_factory=set)  # fed_by layers that read a reshaped view of the site output
    block_outputs: dict[str, str] = field(default_factory=dict)  # block -> the site that quantizes its output
    calls: dict[str, tuple[str, int]] = field(default_factory=dict)  # module -> (its caller, calls): a site per call
    shared_calls: dict[str, int] = field(default_factory=dict)  # module -> calls, all on one site quantizer
    relu_fused: set[str] = field(default_factory=set)  # sites whose output only a functional ReLU reads
    fused_act: dict[str, str] = field(default_factory=dict)  # layer -> the site of the one activation fused into it


def site_name(module: str, call: int) -> str:
    """The site of `module`'s call `call` (0-based): the plain module name for call 0."""
    return module if call == 0 else f"{module}@{call}"


def parse_site(name: str) -> tuple[str, int]:
    """(module name, call index) of a site name (the inverse of site_name)."""
    module, at, k = name.rpartition("@")
    if at and k.isdigit() and k == str(int(k)) and int(k) >= 1:
        return module, int(k)
    return name, 0


def call_info(found: Sites, site: str) -> dict:
    """What quant_config records about a site's module being called more than once."""
    module, _ = parse_site(site)
    if module in found.calls:
        caller, n = found.calls[module]
        return {"caller": caller, "calls": n}
    if module in found.shared_calls:
        return {"shared_calls": found.shared_calls[module]}
    return {}


def calls_from_config(entries: list[dict]) -> dict[str, tuple[str, int]]:
    """Module -> (caller, calls) of the per-call sites listed in quant_config["sites"] (call_info's fields)."""
    calls: dict[str, tuple[str, int]] = {}
    for e in entries:
        if "calls" in e:
            module, k = parse_site(e["name"])
            if not isinstance(e["calls"], int) or not 0 <= k < e["calls"] or not isinstance(e.get("caller"), str):
                raise FileFormatError(f"site {e['name']!r}: malformed call record {e!r:.200}")
            calls[module] = (e["caller"], e["calls"])
    return calls


def only(found: Sites, names) -> Sites:
    """The sites among `names` (e.g. those quantizing the block outputs), with the layers they feed."""
    keep = set(names)
    fed = {k: v for k, v in found.fed_by.items() if v in keep}
    modules = {parse_site(n)[0] for n in keep}
    return Sites([n for n in found.sites if n in keep], fed, list(found.input_readers),
                 {n for n in found.via_view if n in fed},
                 {b: s for b, s in found.block_outputs.items() if s in keep},
                 {m: c for m, c in found.calls.items() if m in modules},
                 {m: c for m, c in found.shared_calls.items() if m in modules},
                 {n for n in found.relu_fused if n in keep},
                 {k: v for k, v in found.fused_act.items() if v in keep})


class SiteHook:
    """Forward hook applying per_call[k] to the output of the module's call k (one entry: to every call).

    An entry returning a tensor (a Quantizer) replaces the output; None (an observer) or a None entry (a call
    that is not a site) leaves it. A plain object, so deepcopy maps it to the copied quantizers; CallReset,
    registered on the caller, sets `calls` back to 0 at every call of the caller."""

    def __init__(self, per_call: list[Callable | None], module: str):
        self.per_call = list(per_call)
        self.module = module
        self.calls = 0

    def __call__(self, module, args, out):
        k, self.calls = self.calls, self.calls + 1
        if len(self.per_call) == 1:
            fn = self.per_call[0]
        elif k < len(self.per_call):
            fn = self.per_call[k]
        else:
            raise UnsupportedModelError(f"module {self.module!r} ran {k + 1} times in one call of its caller; the "
                                        f"quantized model has a site per call for {len(self.per_call)} calls")
        if fn is None or not isinstance(out, torch.Tensor):
            return out
        got = fn(out)
        return out if got is None else got


class CallReset:
    """Forward pre-hook on a caller: its per-call site hooks count their calls from 0 again."""

    def __init__(self, hooks: list[SiteHook]):
        self.hooks = hooks

    def __call__(self, module, args):
        for h in self.hooks:
            h.calls = 0


def attach(model: nn.Module, fns: dict[str, Callable], calls: dict[str, tuple[str, int]] | None = None) -> list:
    """Register a SiteHook per site module on `model`, applying fns[site] (a Quantizer, or an observer) to the
    output of that site's call; calls: module -> (caller, number of calls) for modules with a site per call
    (Sites.calls), whose callers get a CallReset. Returns the hook handles."""
    calls = calls or {}
    per_module: dict[str, dict[int, Callable]] = {}
    for name, fn in fns.items():
        module, k = parse_site(name)
        if k and module not in calls:
            raise UnsupportedModelError(f"site {name!r} names call {k} of {module!r}, whose calls are not counted")
        per_module.setdefault(module, {})[k] = fn
    handles, resets = [], {}
    for module, per in per_module.items():
        if module in calls:
            caller, n = calls[module]
            hook = SiteHook([per.get(k) for k in range(n)], module)
            resets.setdefault(caller, []).append(hook)
        else:
            hook = SiteHook([per[0]], module)
        handles.append(model.get_submodule(module).register_forward_hook(hook))
    for caller, hooks in resets.items():
        handles.append(model.get_submodule(caller).register_forward_pre_hook(CallReset(hooks)))
    return handles


def _is_leaf(m: nn.Module) -> bool:
    """A module whose output is one op's: no children, or a Conv2d/Linear (its children, such as a "same"
    padding conv's ZeroPad2d, are part of its op and are not sites of their own)."""
    return isinstance(m, _LAYERS) or next(iter(m.children()), None) is None


@torch.no_grad()
def returning_input(model: nn.Module, example: torch.Tensor) -> set[str]:
    """Parameter-free leaves that return their input object unchanged at every call (timm's DropPath and
    Dropout variants in eval mode): pass-through modules like nn.Identity, found by what they do."""
    seen: dict[str, bool] = {}
    handles = []

    def hook(name):
        def record(m, args, out):
            same = bool(args) and out is args[0] and out._version == before.get(name)
            seen[name] = seen.get(name, True) and same
        return record

    before: dict[str, int] = {}

    def pre(name):
        def record(m, args):
            if args and isinstance(args[0], torch.Tensor):
                before[name] = args[0]._version
        return record

    for name, m in layer_level_modules(model):
        if (name and _is_leaf(m) and not isinstance(m, (*_LAYERS, *PASS_THROUGH))
                and next(iter(m.parameters()), None) is None):
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(hook(name))]
    try:
        model(example)
    finally:
        for h in handles:
            h.remove()
    return {n for n, same in seen.items() if same}


_RELUS = {torch.nn.functional.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


def _tensors_in(args) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += [t for t in a if isinstance(t, torch.Tensor)]
    return out


class _FunctionalReads(TorchFunctionMode):
    """Records the torch functions that the model's own code calls (not those inside a leaf module's forward):
    reads[id(t)] = indices of the calls that read tensor t; relus = (index, id(input), output) for each ReLU.
    An in-place ReLU on a module's output that nothing changed before is its own write, not an in-place add:
    `version` (find_sites' record of each output's version when it was made) is moved past it."""

    def __init__(self, in_leaf: Callable[[], bool], keep: list, version: dict[int, int]):
        super().__init__()
        self.in_leaf, self.keep, self.version = in_leaf, keep, version
        self.reads: dict[int, list[int]] = {}
        self.relus: list[tuple[int, int, torch.Tensor]] = []
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_leaf():
            return func(*args, **kwargs)
        ins = _tensors_in(list(args) + list(kwargs.values()))
        before = ins[0]._version if ins else 0
        out = func(*args, **kwargs)
        # None: an indexed assignment (buf[:, k:] = t) reads t too
        if out is None or isinstance(out, torch.Tensor) or (isinstance(out, (tuple, list)) and _tensors_in(out)):
            k, self.n = self.n, self.n + 1
            for t in ins:
                self.keep.append(t)
                self.reads.setdefault(id(t), []).append(k)
            if func in _RELUS and ins and isinstance(out, torch.Tensor):
                src = id(ins[0])
                if out is ins[0]:  # in place
                    if self.version.get(src) != before:
                        return out  # changed before (an in-place add): not a site's plain output
                    self.version[src] = out._version
                else:  # so that a later in-place change of the ReLU's output (y += skip) is seen
                    self.version.setdefault(id(out), out._version)
                self.keep.append(out)
                self.relus.append((k, src, out))
        return out


@torch.no_grad()
def find_sites(model: nn.Module, example: torch.Tensor, blocks: list[str], layers: list[str]) -> Sites:
    """The sites of `model` (BN folded, eval mode) for one forward pass of `example` (see the module docstring).

    blocks: names of the residual blocks (reconstruction units); layers: the Conv2d/Linear being quantized."""
    keep: list[torch.Tensor] = []                          # keeps every seen tensor alive (ids stay unique)
    producer: dict[int, str | None] = {}                   # id(tensor) -> the call (site_name) that made it
    readers: dict[int, list[str]] = {}                     # id(tensor) -> calls (site_name) of leaves that read it
    inputs: dict[str, torch.Tensor] = {}                   # layer -> its input, first call
    outputs: dict[str, int] = {}                           # call -> id(its output)
    order: list[str] = []                                  # calls, in the order they returned
    version: dict[int, int] = {}                           # id(tensor) -> its version when it was made
    changed: set[int] = set()                              # tensors modified in place (out += identity) before a read
    inplace_leaves: set[str] = set()                       # leaf calls whose output a functional op changed in place
    passes: list[tuple[int, int]] = []                     # (id(out), id(in)) of pass-through modules, in order
    read_at: dict[int, list[int]] = {}                     # id(tensor) -> reads.n when a (non pass-through) leaf read it
    running: list[tuple[str, int]] = []                    # (module, call index) of the forwards under way
    visible = layer_level_modules(model)
    mods = dict(visible)
    identity = returning_input(model, example)

    def passes_through(name, mod):
        return isinstance(mod, PASS_THROUGH) or name in identity

    reads = _FunctionalReads(lambda: bool(running) and _is_leaf(mods[running[-1][0]]), keep, version)
    n_calls: dict[str, int] = {}                           # module -> calls so far
    callers: dict[str, set[str | None]] = {}               # module -> the innermost modules running when it was called
    handles = []
    block_set, layer_set = set(blocks), set(layers)
    # composite modules (not containers, not the model itself) whose output may be made by a functional op
    composites = {n for n, m in visible
                  if n and not _is_leaf(m) and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict))}

    def enter(name):
        def hook(m, args):
            callers.setdefault(name, set()).add(running[-1][0] if running else None)
            k = n_calls.get(name, 0)
            n_calls[name] = k + 1
            running.append((name, k))
        return hook

    def leave(m, args, out):
        running.pop()

    def pre(name, mod):
        def hook(m, args):
            if _is_leaf(mod) and not passes_through(name, mod):  # every argument (Add()(a, b)), not just args[0]
                for t in _tensors_in(list(args)):
                    keep.append(t)
                    read_at.setdefault(id(t), []).append(reads.n)  # after the functional calls so far
            if not args or not isinstance(args[0], torch.Tensor):
                return
            keep.append(args[0])
            if id(args[0]) in version and args[0]._version != version[id(args[0])]:
                changed.add(id(args[0]))  # a functional op (an in-place add) read it first
                return
            if _is_leaf(mod) and not passes_through(name, mod):  # `enter` ran first: this call is on top
                readers.setdefault(id(args[0]), []).append(site_name(name, running[-1][1]))
            if name in layer_set:
                inputs.setdefault(name, args[0])
        return hook

    def post(name, mod):
        def hook(m, args, out):
            if not isinstance(out, torch.Tensor):
                return
            call = site_name(name, running[-1][1])  # `leave` runs after this hook: this call is on top
            keep.append(out)
            version.setdefault(id(out), out._version)
            outputs[call] = id(out)
            order.append(call)
            if passes_through(name, mod):
                src = id(args[0]) if args and isinstance(args[0], torch.Tensor) else None
                if src == id(out):
                    return  # the same object back (eval Identity/DropPath): its producer stays its producer
                if src in changed:  # changed in place since its producer made it: not that site's values
                    src = None
                producer[id(out)] = producer.get(src) if src is not None else None
                if src is not None and src != id(out):
                    passes.append((id(out), src))
                    read_at.setdefault(src, []).append(reads.n)  # a view (nn.Flatten) reads it
            elif _is_leaf(mod) or name in block_set or name in composites:
                made = producer.get(id(out))
                if made is not None and not _is_leaf(mod) and version.get(id(out)) == out._version:
                    return  # the block returns a module's output as is (its last ReLU): that module made it
                if made is not None and version.get(id(out)) != out._version:
                    # a block returning a leaf's output after an in-place add (result += x): that leaf's
                    # output is an add operand and gets its own site; the block's output is a new value
                    changed.add(id(out))
                    inplace_leaves.add(made)
                producer[id(out)] = call
        return hook

    for name, mod in visible:  # hooks run in registration order: enter first, leave last
        handles.append(mod.register_forward_pre_hook(enter(name)))
        if name:
            handles.append(mod.register_forward_pre_hook(pre(name, mod)))
            handles.append(mod.register_forward_hook(post(name, mod)))
        handles.append(mod.register_forward_hook(leave))
    try:
        with reads:
            y = model(example)
    finally:
        for h in handles:
            h.remove()
    # a module called more than once: a site per call where one caller, called once, makes all its calls
    # (and the module is not a reconstruction unit run alone); else its calls share one site, as call 0
    per_call, shared = {}, {}
    for name, n in n_calls.items():
        if n < 2 or not name:
            continue
        (caller, *others) = callers[name]
        if (not others and caller is not None and n_calls.get(caller) == 1 and name not in layer_set
                and name not in block_set and not isinstance(model.get_submodule(name), _LAYERS)):
            per_call[name] = (caller, n)
        else:
            shared[name] = n
    canon = {site_name(m, k): m for m, n in shared.items() for k in range(1, n)}
    all_outputs: dict[str, set[int]] = {}                  # site -> id(its output) of every call it quantizes
    first: dict[str, int] = {}
    for call in order:
        site = canon.get(call, call)
        all_outputs.setdefault(site, set()).add(outputs[call])
        first.setdefault(site, outputs[call])
    outputs = first
    order = list(first)
    producer = {i: canon.get(p, p) for i, p in producer.items()}
    inplace_leaves = {canon.get(c, c) for c in inplace_leaves}
    out_id = id(y)
    sites: list[str] = []
    leaf_sites: set[int] = set()
    fused_call: dict[str, str] = {}                        # layer -> the one activation call reading its output
    for name in order:
        mod = mods[parse_site(name)[0]]
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
            calls = readers.get(oid, [])
            if calls and oid not in changed and all(isinstance(mods[parse_site(c)[0]], ACTIVATIONS) for c in calls):
                # the activation is its only reader: no functional op (y + act(y)), no view (nn.Flatten)
                if len(calls) == 1 and not reads.reads.get(oid) and not any(src == oid for _, src in passes):
                    fused_call[name] = calls[0]
                continue  # fused: the activation's output is the site
        sites.append(name)
        leaf_sites.add(oid)
    # blocks, and any other composite module whose output a functional op made (F.relu(x, inplace=True) in
    # GoogLeNet's BasicConv2d): its output is a new tensor that other ops read
    for name in [b for b in order if b in block_set or parse_site(b)[0] in composites]:
        oid = outputs.get(name)
        if oid is not None and oid != out_id and producer.get(oid) == name and oid not in leaf_sites:
            sites.append(name)
    rank = {n: i for i, n in enumerate(order)}
    sites.sort(key=lambda n: rank[n])
    site_set = set(sites)
    relu_fused = _fuse_functional_relus(site_set, all_outputs, producer, read_at, reads, changed, out_id)
    for out, src in passes:  # pass-through modules after a fused ReLU (eval Dropout, Identity)
        if producer.get(out) is None and producer.get(src) is not None:
            producer[out] = producer[src]
    # a layer reads a site's output directly, or a view of it (torch.flatten of a pooled tensor)
    site_storage = {}
    for t in keep:
        name = producer.get(id(t))
        if name in site_set and outputs.get(name) == id(t) and id(t) not in changed:
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
            # through nn.Flatten or torch.flatten, or a fused functional ReLU not in place: another object
            if id(x) not in all_outputs.get(src, ()):
                via_view.add(layer)
    block_out = {b: producer.get(outputs[b]) for b in blocks
                 if b in outputs and producer.get(outputs[b]) in site_set}
    modules = {parse_site(n)[0] for n in sites}
    # a layer run once whose activation is a site of a module run once, outside every block (a block unit learns
    # the sites inside it): BRECQ reconstructs the pair as one unit
    fused_act = {layer: act for layer, act in fused_call.items()
                 if act in site_set and parse_site(layer)[0] in layer_set and n_calls.get(layer) == 1
                 and n_calls.get(parse_site(act)[0]) == 1
                 and not any(act == b or act.startswith(b + ".") for b in blocks)}
    return Sites(sites, fed_by, readers_of_input, via_view, block_out,
                 {m: c for m, c in per_call.items() if m in modules}, {m: n for m, n in shared.items() if m in modules},
                 relu_fused, fused_act)


def _fuse_functional_relus(sites: set[str], all_outputs, producer, read_at, reads: _FunctionalReads,
                           changed, out_id) -> set[str]:
    """The sites whose output (one call's) a functional ReLU alone reads: no module and no other op (before
    the ReLU, for an in-place one). A non-in-place ReLU's output is credited to the site (producer), so the
    layers reading it are fed by the site (and apply its quantizer again: a view of its values)."""
    fused = set()
    for k, src, out in reads.relus:
        site = producer.get(src)
        if site not in sites or all_outputs.get(site) != {src} or src in changed or src == out_id:
            continue
        inplace = id(out) == src
        if any(j <= k or not inplace for j in read_at.get(src, [])):
            continue  # a module reads the value before the ReLU (or, not in place, the value it leaves)
        if any(j < k or (j > k and not inplace) for j in reads.reads.get(src, [])):
            continue  # another op reads it
        if not inplace:
            producer[id(out)] = site
        fused.add(site)
    return fused

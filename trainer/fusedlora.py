"""Fewer passes over memory for peft's plain LoRA layers in training: the same numbers, computed in fewer operations
(equal to float rounding: scaling inside the product rounds once where peft rounds twice, exact when the scaling
is a power of two, as alpha = 2 r is).

peft computes an adapted linear layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`, each piece its own
operation. On a CPU the small LoRA products and the elementwise passes around them are a large share of a step
(bench/RESULTS.md, "Where the time goes"), and peft has no option to fuse them (Unsloth does it with its own
kernels), so this module routes the forward of peft's layers through two fusions, leaving the layers, their
parameters, their names and what is saved exactly as peft made them:

- **B's product adds into the base output.** `out.addmm_(h, B^T, alpha=scaling)` writes `scaling * h @ B^T` into
  the base layer's output inside the matrix product: no separate multiplication by `scaling` and no addition,
  forward or backward (the base output is not kept for the backward pass, so updating it in place is safe).
- **Siblings share one LoRA-A product.** q, k and v of an attention block read the same hidden states, and so do
  the MLP's gate and up projections. With no LoRA dropout their LoRA-A layers see the very same tensor, so one
  product against their weights stacked, (tokens x hidden) @ (hidden x 3r), gives the same numbers as three: a
  better-shaped product (rank-8 products run far below a CPU's matrix rate) and one backward product for the
  input's gradient instead of three. The stacked weight is built from the layers' own weights at each forward
  (a small copy), so gradients reach each layer's weight and an optimiser step is seen at once.

Anything else runs peft's own forward: a layer whose adapters are disabled or merged, several active adapters,
DoRA or another variant, a quantised or non-nn.Linear base layer, a dtype cast on the way, extra arguments.
A group of siblings that turns out not to receive one tensor stops sharing after a few calls.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

from .targets import ROLE_NAMES

# Leaf names of the layers that read one input, per block: attention q, k, v (every family's names), MLP gate+up.
SHARED_INPUT_SIBLINGS = (
    frozenset(ROLE_NAMES["q"] + ROLE_NAMES["k"] + ROLE_NAMES["v"]),
    frozenset(("gate_proj", "up_proj", "w1", "w3")),
)
_GIVE_UP_AFTER = 4  # calls per member of a group with no product ever shared: the members do not read one tensor


class SharedInputLoraA:
    """The LoRA-A layers (nn.Linear, no bias) of sibling projections; `output(i, x)` is layer i's output."""

    def __init__(self, layers: list):
        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self.sharing = True
        self.shared_calls = self.calls = 0
        self._clear()

    def _clear(self):
        self._input, self._outputs, self._key, self._taken = None, None, None, set()

    def _key_now(self):
        import torch

        return torch.is_grad_enabled(), tuple(layer.weight._version for layer in self.layers)

    def output(self, index: int, x):
        import torch
        import torch.nn.functional as F

        self.calls += 1
        if self.sharing and self._input is x and index not in self._taken and self._key == self._key_now():
            self.shared_calls += 1
            self._taken.add(index)
            out = self._outputs[index]
            if len(self._taken) == len(self.layers):
                self._clear()  # every sibling has its slice: hold no activation past this block
            return out
        if self.sharing and self.shared_calls == 0 and self.calls > _GIVE_UP_AFTER * len(self.layers):
            self.sharing = False
            self._clear()
        if not self.sharing:
            return F.linear(x, self.layers[index].weight)
        stacked = torch.cat([layer.weight for layer in self.layers])
        self._outputs = F.linear(x, stacked).split(self.sizes, dim=-1)
        self._input, self._key, self._taken = x, self._key_now(), {index}
        return self._outputs[index]


def _plain_lora(layer, adapter: str) -> bool:
    """Whether `layer` (a peft LoRA layer) runs `adapter` as plain LoRA over an unquantised nn.Linear."""
    import torch

    if type(getattr(layer, "base_layer", None)) is not torch.nn.Linear or adapter not in layer.lora_A:
        return False
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear or lora_a.bias is not None \
            or lora_b.bias is not None or adapter in getattr(layer, "lora_variant", {}):
        return False
    weights = (layer.base_layer.weight, lora_a.weight, lora_b.weight)
    # A DTensor (FSDP) or a quantised tensor is not a plain tensor: its products are not these.
    return all(type(w.data) is torch.Tensor for w in weights) and len({w.dtype for w in weights}) == 1


def _fused_forward(layer, x, *args, **kwargs):
    """peft's LoRA Linear forward with B's product added into the base output; peft's own where it differs."""
    adapters = layer.active_adapters
    if args or kwargs or layer.disable_adapters or layer.merged or len(adapters) != 1 \
            or adapters[0] != layer.fused_adapter or x.dtype != layer.base_layer.weight.dtype:
        return type(layer).forward(layer, x, *args, **kwargs)
    adapter = adapters[0]
    h = layer.lora_A[adapter](layer.lora_dropout[adapter](x))
    out = layer.base_layer(x.reshape(-1, x.shape[-1]))
    out.addmm_(h.reshape(-1, h.shape[-1]), layer.lora_B[adapter].weight.t(), alpha=layer.scaling[adapter])
    return out.view(*x.shape[:-1], out.shape[-1])


@dataclass
class FusedLora:
    """What `fuse_lora_layers` changed, to report and to undo."""

    layers: list = field(default_factory=list)  # peft LoRA layers whose forward is `_fused_forward`
    groups: list = field(default_factory=list)  # SharedInputLoraA, one per block and sibling set

    def describe(self) -> str:
        if not self.layers:
            return "LoRA layers run as peft runs them (no plain LoRA layer over an unquantised linear layer)."
        shared = sum(len(g.layers) for g in self.groups)
        return (f"{len(self.layers)} LoRA layers add their product into the base layer's output"
                + (f"; {shared} of them share one LoRA-A product in {len(self.groups)} groups of siblings"
                   if self.groups else "; no LoRA-A product shared (" + self._why_not_shared() + ")") + ".")

    def _why_not_shared(self) -> str:
        import torch

        if any(not isinstance(d, torch.nn.Identity) for layer in self.layers for d in layer.lora_dropout.values()):
            return "LoRA dropout is on: each layer draws its own mask"
        return "no adapted layers read one input"

    def undo(self) -> None:
        """Every layer back to peft's own forward (before the adapter is merged, or the model handed on)."""
        for group in self.groups:
            group._clear()
            for lora_a in group.layers:
                lora_a.__dict__.pop("forward", None)
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("fused_adapter", None)
        self.layers, self.groups = [], []


def fuse_lora_layers(peft_model, adapter: str = "default") -> FusedLora:
    """Route `peft_model`'s plain LoRA layers of `adapter` through the fused forward, and the LoRA-A layers of
    siblings without dropout through one shared product (module docstring)."""
    import torch

    fused = FusedLora()
    for layer in peft_model.modules():
        if hasattr(layer, "lora_A") and _plain_lora(layer, adapter):
            layer.fused_adapter = adapter
            layer.forward = types.MethodType(_fused_forward, layer)
            fused.layers.append(layer)
    for parent in peft_model.modules():
        children = dict(parent.named_children())
        for siblings in SHARED_INPUT_SIBLINGS:
            members = [children[name] for name in sorted(siblings & children.keys())
                       if getattr(children[name], "fused_adapter", None) == adapter
                       and isinstance(children[name].lora_dropout[adapter], torch.nn.Identity)]
            lora_as = [m.lora_A[adapter] for m in members]
            if len(lora_as) < 2 or len({(a.in_features, a.weight.dtype, a.weight.device) for a in lora_as}) != 1:
                continue
            group = SharedInputLoraA(lora_as)
            for index, lora_a in enumerate(lora_as):
                lora_a.forward = types.MethodType(lambda _self, x, g=group, i=index: g.output(i, x), lora_a)
            fused.groups.append(group)
    return fused

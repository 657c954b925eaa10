"""Low-rank adapters (LoRA): a frozen linear layer plus a trainable update B @ A of rank r,
scaled by alpha / r. B starts at zero, so training starts from the pretrained function; after
training the update can be folded into the weight (`merge_lora`) and the model is plain again."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.drop(x) @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_b @ self.lora_a) * self.scale
        for p in self.base.parameters():
            p.requires_grad_(True)
        return self.base


def add_lora(module: nn.Module, rank: int = 8, alpha: float = 16.0, targets: tuple[str, ...] = ("qkv_proj", "o_proj"),
             dropout: float = 0.0) -> int:
    """Wrap the named linear layers in place and freeze everything else; returns how many."""
    for p in module.parameters():
        p.requires_grad_(False)
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                n += 1
    return n


def merge_lora(module: nn.Module) -> None:
    """Fold every adapter into its weight (the saved model then needs no LoRA code)."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())


def adapter_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by parameter name ("blocks.3.attn.qkv_proj.lora_a", ...)."""
    return {n: p.detach() for n, p in module.named_parameters() if n.endswith((".lora_a", ".lora_b"))}


@torch.no_grad()
def fold_adapters(module: nn.Module, tensors: dict[str, torch.Tensor], scale: float) -> int:
    """Add saved adapters to a plain (not wrapped) model's weights: W += scale * B @ A for each
    layer named in `tensors` (as adapter_state wrote them). A float layer changes in place; a
    quantized one (int8 / int4, with float_weight) becomes int8 from its float weight plus the
    update: 4-bit weights sit on their grid already, and an update smaller than a grid step
    (as an adapter's is) would round straight back to them. Returns how many layers changed."""
    from lmforge.models.quant import Int8Linear

    n = 0
    for key, a in tensors.items():
        if not key.endswith(".lora_a"):
            continue
        path = key[:-len(".lora_a")]
        b = tensors.get(path + ".lora_b")
        try:
            layer = module.get_submodule(path)
        except AttributeError:
            raise ValueError(f"adapter {path}: the model has no such layer") from None
        if b is None or a.size(1) != getattr(layer, "in_features", None) or b.size(0) != layer.out_features:
            raise ValueError(f"adapter {path} does not fit the model")
        delta = scale * (b.float() @ a.float())  # (out, in)
        if isinstance(layer, nn.Linear):
            layer.weight += delta.to(layer.weight.dtype)
        elif hasattr(layer, "float_weight"):
            bias = getattr(layer, "bias", None)
            plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device=delta.device)
            plain.weight.copy_(layer.float_weight() + delta.to(plain.weight.device))
            if bias is not None:
                plain.bias.copy_(bias)
            new = Int8Linear.from_linear(plain)
            parent, _, name = path.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, name, new)
        else:
            raise ValueError(f"adapter {path}: cannot add to a {type(layer).__name__}")
        n += 1
    if n and hasattr(module, "invalidate_plan"):  # the C decoding step points at the old weights
        module.invalidate_plan()
    return n

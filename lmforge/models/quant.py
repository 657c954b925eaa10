"""Weight-only int8 quantization for inference.

Every nn.Linear becomes an Int8Linear: weights rounded to int8 per output channel with one
bf16 scale each (symmetric, absmax / 127). On CPU the matmul runs in PyTorch's
`_weight_int8pack_mm` kernel with bf16 activations, which reads a quarter of the bytes of a
float32 matmul (decoding one token is memory-bound); elsewhere the weight is dequantized on
the fly. Activations between layers stay in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer("bias", torch.empty(out_features, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        w = lin.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=w.device)
        q.weight.copy_(torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8))
        q.scales.copy_(scale.to(torch.bfloat16))
        if lin.bias is not None:
            q.bias.copy_(lin.bias.detach())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        if x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.weight, self.scales)  # (N, out)
        else:
            y = x2.to(torch.bfloat16) @ (self.weight.to(torch.bfloat16) * self.scales[:, None]).t()
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear in place (a tied output projection gets its own int8 copy; the
    input embedding keeps its float table for lookups)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Int8Linear.from_linear(child))
        else:
            quantize_int8(child)
    return model


def build_int8_skeleton(model_cls, cfg) -> nn.Module:
    """An int8 model with no storage (meta device), ready for load_state_dict(assign=True)."""
    with torch.device("meta"):
        model = model_cls(cfg)
        if getattr(cfg, "tie_embeddings", False):
            model.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untie: it gets int8 weights
        quantize_int8(model)
    return model

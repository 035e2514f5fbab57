"""Int8 inference for an encoder's linear layers (`embed.dtype: int8`).

Every `nn.Linear` becomes an `Int8Linear`: its weights are quantised once, per output channel; its
input is quantised at run time, per token (symmetric, scale = the token's largest magnitude / 127);
the product is an exact int32 GEMM (`torch._int_mm`, VNNI on x86: measured 4-5x the fp32 GEMM rate
at MiniLM's shapes), rescaled to fp32. Attention, GELU, layer norms and pooling stay in fp32.

Per-token scales matter twice. BERT-style encoders have a few outlier activations that a single
scale per batch would let crush every other value (measured on MiniLM: cosine to fp32 0.92 with a
scale per tensor, 0.998 with one per token). And a token's quantisation then depends on nothing
else in its batch, so a text's embedding stays bit-identical however it is batched.
"""

from __future__ import annotations

import torch

QMAX = 127  # symmetric int8: -127..127, so negating a value never overflows


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, fp32 scale per row) with `x[i] ~= values[i] * scale[i]`; a row of zeros stays
    zeros. (`abs().amax()`: measured 8x faster than an inf-norm here.)"""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(QMAX)
    return x.div(scale).round_().to(torch.int8), scale


class Int8Linear(torch.nn.Module):
    """`nn.Linear` in int8: per-channel weights, per-token activations, int32 accumulation."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_q", q.t())  # (in, out), column-major: _int_mm's fastest layout here
        self.register_buffer("weight_scale", scale.reshape(-1))
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, self.in_features))
        y = torch._int_mm(xq, self.weight_q).float().mul_(xs).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(model: torch.nn.Module) -> int:
    """Replace every `nn.Linear` in `model` by an `Int8Linear`, in place; returns how many."""
    count = 0
    for name, child in list(model.named_children()):
        if type(child) is torch.nn.Linear:
            setattr(model, name, Int8Linear(child))
            count += 1
        else:
            count += quantize_linears(child)
    return count

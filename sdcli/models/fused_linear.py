"""bf16 linear layers on the CPU with the element-wise op after them done inside oneDNN's GEMM, as a post-op.

The UNet's transformer blocks follow three of their linear layers with a memory-bound element-wise op: GEGLU's
projection with gelu(gate) * value, and the attention output and feed-forward projections with the residual add;
SD3's and FLUX's MLPs follow their first layer with a tanh GELU (FLUX's in row pieces of the weight: flux.gelu_rows).
Run apart, each op reads and writes the whole activation again (GEGLU also copies its gate out of the projection):
at 4096 tokens that is several 21-42 MB passes per block. oneDNN applies such ops to the GEMM's fp32 accumulator
before it stores the result (`torch.ops.mkldnn._linear_pointwise`, the op inductor's CPU fusion emits): GEGLU
becomes two GEMMs (gate with a GELU post-op, then value with a multiply-by-gate post-op), the projections one GEMM
with an add post-op. OpenVINO's CPU plugin fuses the same way.

Measured (Sapphire Rapids-class with AMX, 2 threads, bf16): GEGLU 0.50x the time at 4096 tokens, 0.63x at 1024,
0.89x at 256; the residual projections 0.57-0.95x; SD3.5 Medium's MLP 0.82x at 512px, 0.93x at 1024px; FLUX's
3072 -> 12288 projection with its GELU 0.88x at 1024px (Zen 5) (docs/benchmarks.md). The results are more exact,
not less: one bf16 rounding where the separate ops took two or three (GEGLU's largest error against fp32 0.045 vs
0.076; the projections' about half), so these are not the same bits as the separate ops, and the image moves
within the bf16 guard. How the GEMM is split between threads is oneDNN's own choice (its inner-product primitive
here, its matmul for the plain layer): without AMX neither splits a sum by thread count (168 shapes probed with
oneDNN held to its AVX512-BF16 kernels); with AMX both do for some shapes, the known gap the README names.

The binary post-ops (GEGLU's product, the residual add) pay only with AMX. Without it (Zen 5, AVX512-BF16) oneDNN's
binary post-op made its GEMM slower than the GEMM alone plus a separate in-place pass: at 4096 tokens, 2 threads, in
a UNet call, GEGLU 29.6 against 25.0 ms, the K = 320 projections with the add 4.3 against ~3.4 ms. There GEGLU's
value is a plain GEMM multiplied by the gate in place (the gate keeps its GELU post-op: an eltwise post-op costs
little), and the projections are the plain GEMM with the residual added in place: the separate ops' bits, faster.
`binary_post_ops()` picks; SDCLI_CPU_BINARY_POST_OPS=1 / =0 forces it either way (the A/B).

Where: bf16 tensors on an x86-64 CPU whose oneDNN has bf16 kernels (AVX512-BF16, AMX: where `auto` runs bf16), no
autograd, a plain nn.Linear or a GGUF's QuantizedLinear (its dequantized weight: a GGUF renders the bytes of its
dequantized float file). Elsewhere, the separate ops, as before.
SDCLI_CPU_FUSED_LINEAR=0 switches it off (the A/B).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from sdcli.quant.layers import holds_blocks, weight_rows
from sdcli.runtime import device

SWITCH_ENV = "SDCLI_CPU_FUSED_LINEAR"
BINARY_ENV = "SDCLI_CPU_BINARY_POST_OPS"


def fusable(x: Tensor, linear: nn.Module) -> bool:
    """Whether `linear` applied to `x` runs as oneDNN's post-op GEMM here."""
    quantized = holds_blocks(linear) and isinstance(linear, nn.Linear)
    if not (type(linear) is nn.Linear or quantized) or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return False
    w = linear.weight
    grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in linear.parameters()))
    return ((quantized or w.dtype == torch.bfloat16) and w.device.type == "cpu" and not grad
            and os.environ.get(SWITCH_ENV, "1") != "0" and device.cpu_onednn_bf16())  # fmt: skip


def binary_post_ops() -> bool:
    """Whether GEGLU's product and the residual add run as the GEMM's binary post-op (AMX; see the module's text)."""
    forced = os.environ.get(BINARY_ENV, "")
    return forced == "1" or (forced != "0" and device.cpu_has_amx())


def _rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])  # (tokens, features): the 2-D GEMM oneDNN runs


def linear_gelu(x: Tensor, linear: nn.Module, approximate: str = "none", start: int = 0, stop: int | None = None):
    """gelu(linear(x)) (`approximate` "none": erf, "tanh": SD3's and FLUX's MLPs) with the GELU as a post-op
    (`fusable` holds); only output features [start, stop) (FLUX's MLPs run in pieces: quant/layers.row_pieces).
    A GGUF layer computes with its dequantized weight (quant/layers.weight_rows)."""
    w, b = weight_rows(linear, x.dtype, start, linear.out_features if stop is None else stop)
    out = torch.ops.mkldnn._linear_pointwise(_rows(x), w, b, "gelu", [], approximate)
    return out.view(*x.shape[:-1], w.shape[0])


def geglu(x: Tensor, proj: nn.Linear) -> Tensor:
    """value * gelu(gate), with [value | gate] = proj(x) (erf GELU): two GEMMs, the gate's with the GELU as its
    post-op, the value's with the product as its post-op where `binary_post_ops`, else in place (`fusable` holds)."""
    inner = proj.out_features // 2
    w, b = weight_rows(proj, x.dtype, 0, proj.out_features)
    bv, bg = (None, None) if b is None else (b[:inner], b[inner:])
    rows = _rows(x)
    gate = torch.ops.mkldnn._linear_pointwise(rows, w[inner:], bg, "gelu", [], "none")
    if binary_post_ops():
        out = torch.ops.mkldnn._linear_pointwise.binary(rows, gate, w[:inner], bv, "mul")
    else:  # the value rounded to bf16, then the product in place: one more rounding than the post-op
        out = torch.ops.mkldnn._linear_pointwise(rows, w[:inner], bv, "none", [], "").mul_(gate)
    return out.view(*x.shape[:-1], inner)


def linear_add(x: Tensor, linear: nn.Module, residual: Tensor | None) -> Tensor:
    """residual + linear(x), the add inside the GEMM where `fusable` and `binary_post_ops` hold (else in place on
    the GEMM's fresh output); just linear(x) without a residual."""
    if residual is None:
        return linear(x)
    same_shape = residual.shape == (*x.shape[:-1], linear.out_features)
    if not fusable(x, linear) or residual.dtype != torch.bfloat16 or not same_shape:
        return residual + linear(x)
    w, b = weight_rows(linear, x.dtype, 0, linear.out_features)
    if not binary_post_ops():  # the separate ops' bits (oneDNN's GEMM is torch's linear), the add in place
        return torch.ops.mkldnn._linear_pointwise(_rows(x), w, b, "none", [], "").view(residual.shape).add_(residual)
    out = torch.ops.mkldnn._linear_pointwise.binary(_rows(x), _rows(residual.contiguous()), w, b, "add")
    return out.view(residual.shape)

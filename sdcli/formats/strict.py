"""Strict loading: every module key filled from the file, every file key placed, shapes and dtypes checked, all
problems listed in one error; known extras of real files skipped on purpose by IGNORED_KEYS.

A plan maps each module key to (LDM key, chunk of a fused q/k/v tensor, "T" for a stored transpose, or None).
GGUF files (formats/gguf.py) may hold GGML blocks: a part that can keeps them so, its Linear/Conv2d layers
dequantizing in their forward (quant/layers.py); any other quantized tensor is dequantized at load.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import Tensor, nn

from sdcli.runtime.device import is_channels_last, prefers_channels_last
from sdcli.runtime.errors import BadInputError, NumericalError
from sdcli.formats.safetensors import FLOAT_DTYPES, FP8_DTYPES
from sdcli.formats.source import cast_copy_
from sdcli.quant.dequantize import check_supported
from sdcli.quant.layers import quantize_modules

# Known extras in real files, skipped on purpose (never loaded, never an error):
IGNORED_KEYS = [
    re.compile(r"^model_ema\."),  # EMA copies and their bookkeeping (decay, num_updates)
    re.compile(  # diffusion schedule buffers of LatentDiffusion; our schedule is computed, not loaded
        r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod|"
        r"log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|"
        r"posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|"
        r"logvar|model_ema_decay|num_updates)$"
    ),
    re.compile(r"position_ids$"),  # a buffer, not a parameter (transformers >= 4.31 does not store it)
    re.compile(r"^cond_stage_model\.model\.(logit_scale|text_projection)$"),  # only for CLIP's pooled output
    re.compile(r"^conditioner\.embedders\.\d+\.model\.logit_scale$"),  # SDXL's OpenCLIP: CLIP's training only
    re.compile(r"^denoiser\.sigmas$"),  # sgm's DiscreteDenoiser buffer (computed, as the schedule above)
    re.compile(r"^lora_"),  # LoRA keys merged into some files' headers are not weights of this model
    re.compile(r"^text_encoders\.\w+\.(transformer\.)?logit_scale$"),  # SD3 files' CLIPs: CLIP's training only
    # a ComfyUI clip_l / clip_g file given for SD1/SDXL (--clip-l, --clip-g) carries CLIP's logit_scale too
    re.compile(r"^(cond_stage_model|conditioner\.embedders\.\d+)\.transformer\.logit_scale$"),
]


def is_ignored(key: str) -> bool:
    return any(p.search(key) for p in IGNORED_KEYS)


Plan = dict[str, tuple[str, int | str | None]]


def identity_plan(keys: list[str], prefix: str) -> tuple[Plan, list[str]]:
    return {k[len(prefix):]: (k, None) for k in keys if k.startswith(prefix) and not is_ignored(k)}, []


def listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _planned_shape(source, ldm_key: str, chunk: int | str | None) -> tuple[int, ...]:
    shape = source.entries[ldm_key].shape
    if chunk == "T":
        return tuple(reversed(shape))
    return shape if chunk is None else (shape[0] // 3, *shape[1:])


def check_strict(part: str, source, plan: Plan, expected: dict[str, tuple[int, ...]],
                 unplaced: list[str]) -> None:  # fmt: skip
    """Raise BadInputError listing missing, unexpected and mis-shaped keys (file names where we have them)."""
    missing = sorted(k for k in expected if k not in plan)
    unexpected = sorted([plan[k][0] for k in plan if k not in expected] + unplaced)
    wrong = sorted(
        f"{plan[k][0]} {list(_planned_shape(source, *plan[k]))} != {list(shape)}"
        for k, shape in expected.items()
        if k in plan and _planned_shape(source, *plan[k]) != shape
    )
    problems = [f"{name}: {listing(items)}" for name, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items]  # fmt: skip
    if problems:
        raise BadInputError(f"{source.path}: {part} weights do not match the model: " + "; ".join(problems))


CAST_CHUNK = 1 << 20  # elements per cast-and-check piece: 4 MB in fp32, still in cache when it is checked


def extremes(piece: Tensor) -> Tensor:
    """(min, max) of `piece` as float32: NaN anywhere makes one of them NaN, Inf makes one infinite, and unlike a
    sum it cannot overflow. Per 1M elements (Zen 4, 2 threads): 0.06 ms on bf16/fp16 against 0.15 ms for their
    float32 sum; on fp32, 0.08 against a sum's 0.03 ms (+0.05 s over an SD1.5 fp32 load: one check kept for all)."""
    if piece.numel() == 0:
        return torch.zeros(2, device=piece.device)
    if is_channels_last(piece):
        piece = piece.permute(0, 2, 3, 1)  # the same memory, in order: 7x faster than reducing across its strides
    lo, hi = torch.aminmax(piece)
    return torch.stack([lo.float(), hi.float()])


def _widen(seen: Tensor | None, piece: Tensor) -> Tensor:
    """The running (min, max) of a tensor read piece by piece (NaN propagates through minimum/maximum)."""
    now = extremes(piece)
    return now if seen is None else torch.stack([torch.minimum(seen[0], now[0]), torch.maximum(seen[1], now[1])])


def _cast_and_check(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(t cast to `dtype` contiguously, its (min, max)), taken piece by piece right after each piece is cast, while
    it is in cache: NaN/Inf anywhere shows in them, without a second pass over RAM. On the CPU every piece is cast
    as a streamed one is (cast_copy_)."""
    if t.device.type != "cpu":
        out = t.to(dtype).contiguous()
        return out, extremes(out)
    out = torch.empty(t.shape, dtype=dtype)
    src, dst = t.reshape(-1), out.view(-1)
    seen = None
    for i in range(0, dst.numel(), CAST_CHUNK):
        piece = dst[i : i + CAST_CHUNK]
        cast_copy_(piece, src[i : i + CAST_CHUNK])
        seen = _widen(seen, piece)
    return out, seen if seen is not None else extremes(out)


def _streamed(source, key: str, dtype: torch.dtype, channels_last: bool) -> tuple[Tensor, Tensor]:
    """(the tensor read straight into its final dtype and layout on the CPU, its (min, max)), piece by piece
    (WeightSource.stream): no whole stored-dtype or contiguous copy is ever allocated."""
    shape = source.entries[key].shape
    layout = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
    out = torch.empty(shape, dtype=dtype, memory_format=layout)
    seen = None
    for piece in source.stream(key, out, CAST_CHUNK):
        seen = _widen(seen, piece)
    return out, seen if seen is not None else extremes(out)


def _read_cast(source, plan: Plan, dtype: torch.dtype, device: torch.device,
               channels_last: bool = False) -> dict[str, Tensor]:  # fmt: skip
    """Read every planned tensor once, move it, cast it once; check stored dtypes and finiteness.
    `channels_last`: 4-d weights are read into that layout (a convolutional part that runs in it)."""
    state, seen = {}, []
    for name, (key, chunk) in plan.items():
        entry = source.entries[key]
        if entry.dtype not in FLOAT_DTYPES and not _quantized(entry):
            raise BadInputError(f"{source.path}: tensor {key} has dtype {entry.dtype}, expected a float type")
        if entry.dtype in FP8_DTYPES:  # fp8 files: up-cast here; e4m3 has NaN codes, zeroed as ComfyUI does
            t = _slice(source.get(key).to(device, torch.float32).nan_to_num_(nan=0.0), chunk)
            state[name], bounds = _cast_and_check(t, dtype)
        elif device.type == "cpu" and chunk is None and entry.dtype in FLOAT_DTYPES:
            state[name], bounds = _streamed(source, key, dtype, channels_last)
        else:  # a fused q/k/v part, a stored transpose, an accelerator, GGML blocks: whole tensor, then cast
            state[name], bounds = _cast_and_check(_slice(source.get(key).to(device), chunk), dtype)
        seen.append(bounds)
    if seen:
        bad = ~torch.isfinite(torch.stack(seen).cpu()).all(dim=1)
        if bool(bad.any()):
            names = [plan[n][0] for n, b in zip(plan, bad.tolist()) if b]
            raise NumericalError(f"{source.path}: NaN or Inf in the weights of {listing(names)}")
    return state


def _slice(t: Tensor, chunk: int | str | None) -> Tensor:
    """The module's tensor from the stored one: itself, its transpose ("T") or a third of a fused q/k/v."""
    return t.t() if chunk == "T" else t if chunk is None else t.chunk(3, dim=0)[chunk]


def _quantized(entry) -> bool:
    """GGML blocks of a GGUF file (formats/source.Entry.quantized)."""
    return getattr(entry, "quantized", False)


def _check_dtypes(part: str, source, plan: Plan) -> None:
    """List every non-float tensor at once (load_state_dict would silently cast integers to floats); a GGML type
    sdcli cannot dequantize is refused by name (exit 8)."""
    for key, _ in plan.values():
        if _quantized(source.entries[key]):
            check_supported(source.entries[key].dtype, f"{source.path}: tensor {key}")
    bad = sorted(f"{key} has dtype {source.entries[key].dtype}" for key, _ in plan.values()
                 if source.entries[key].dtype not in FLOAT_DTYPES and not _quantized(source.entries[key]))
    if bad:
        raise BadInputError(f"{source.path}: {part} tensors must be floating point (F32/F16/BF16/F8): "
                            f"{listing(sorted(set(bad)))}")


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _fit_unit_dims(source, plan: Plan, expected: dict[str, tuple[int, ...]]) -> None:
    """GGUF writers add or drop dims of size 1 (ggml trims trailing ones: a (C, C, 1, 1) conv can come as (C, C);
    stable-diffusion.cpp stores SD2/SDXL's linear proj_in (C, C) as a (C, C, 1, 1) conv): such a GGUF entry is
    taken in the module's shape, the element order being the same. Other layouts keep the exact check."""
    for name, (key, chunk) in plan.items():
        entry, want = source.entries[key], expected.get(name)
        if getattr(entry, "gguf", False) and chunk is None and want is not None and entry.shape != want \
                and _squeezed(entry.shape) == _squeezed(want):  # fmt: skip
            source.entries[key] = dataclasses.replace(entry, shape=want)


def check_part(part: str, module: nn.Module, source, plan: Plan, unplaced: list[str]) -> None:
    """Everything load_part checks before reading a value: names, shapes, stored dtypes (the header alone)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    _fit_unit_dims(source, plan, expected)
    check_strict(part, source, plan, expected, unplaced)
    _check_dtypes(part, source, plan)


def _hold_quantized(module: nn.Module, source, plan: Plan, dtype: torch.dtype, device: torch.device) -> Plan:
    """Give `module` its GGML-block weights as they are (quant.layers.quantize_modules: a Linear/Conv2d becomes a
    layer that dequantizes in its forward; another owner gets the weight dequantized); returns the plan left."""
    held = {name: key for name, (key, chunk) in plan.items()
            if chunk is None and (_quantized(source.entries[key]) or _narrow_linear(module, name, source.entries[key],
                                                                                   dtype))}  # fmt: skip
    if not held:
        return plan
    weights = {name: source.quantized(key).to(device) for name, key in held.items()}
    bad = [held[name] for name, q in weights.items() if not q.scales_finite()]
    if bad:
        raise NumericalError(f"{source.path}: NaN or Inf in the weights of {listing(sorted(bad))}")
    quantize_modules(module, weights, dtype)
    return {name: v for name, v in plan.items() if name not in held}


def _narrow_linear(module: nn.Module, name: str, entry, dtype: torch.dtype) -> bool:
    """A GGUF's F16/BF16 Linear weight run in a wider dtype (fp32): kept as stored and cast in each forward, as
    GGML blocks are, instead of held a second time at twice the size (city96's FLUX.1 files keep txt_in, the
    time/guidance/vector embedders and the last layer in BF16: 0.24 GiB in fp32 against 0.12 GiB as stored)."""
    path, _, leaf = name.rpartition(".")
    stored = FLOAT_DTYPES.get(entry.dtype)
    return (getattr(entry, "gguf", False) and leaf == "weight" and stored is not None
            and stored.itemsize < dtype.itemsize and type(module.get_submodule(path)) is nn.Linear)


def load_part(part: str, module: nn.Module, source, plan: Plan, unplaced: list[str],
              dtype: torch.dtype, device: torch.device, quantized: bool = True) -> nn.Module:  # fmt: skip
    """Strictly fill a meta-built `module` from `source` by `plan` (assign: no copy, no random init), its conv
    weights already in the layout the module will run in (models/layout.py). GGML blocks stay so where the module
    takes them (`quantized`); with quantized=False (the VAE) every weight is dequantized to `dtype` at load."""
    check_part(part, module, source, plan, unplaced)
    channels_last = prefers_channels_last(device, dtype) and any(isinstance(m, nn.Conv2d) for m in module.modules())
    rest = _hold_quantized(module, source, plan, dtype, device) if quantized else plan
    state = _read_cast(source, rest, dtype, device, channels_last)
    if len(rest) < len(plan):  # the held weights are in place already: given back as they are, so strict holds
        live = module.state_dict(keep_vars=True)
        state.update({name: live[name] for name in plan if name not in rest})
    module.load_state_dict(state, strict=True, assign=True)
    module._channels_last = channels_last  # run_layout's conversion is done
    return module.requires_grad_(False).eval()


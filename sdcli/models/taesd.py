"""TAESD / TAESDXL, the tiny autoencoder (madebyollin/taesd), in plain PyTorch.

Module attribute paths ARE the original file keys: ``TinyEncoder`` is the original ``Encoder`` Sequential
(``0.weight`` ... ``14.weight``, as in ``taesd_encoder.safetensors``) and ``TinyDecoder`` the original
``Decoder`` Sequential whose index 0 is the parameter-free clamp (``1.weight`` ... ``19.weight``, as in
``taesd_decoder.safetensors``). diffusers' ``AutoencoderTiny`` files use ``encoder.layers.N`` (same N) and
``decoder.layers.N`` (N = original index - 1, since diffusers moved the clamp into ``DecoderTiny.forward``);
``DIFFUSERS_RENAMES`` maps them.

Conventions, chosen to equal diffusers ``AutoencoderTiny.encode(...).latents`` / ``.decode(...).sample``:
* latents are the SCALED (UNet-space) latents: TAESD was trained on them, so there is no division by the
  VAE's 0.18215 / 0.13025 (ComfyUI, which stores unscaled latents, multiplies first; we never need to);
* images are in [-1, 1] on both sides; the networks themselves work in [0, 1] (x * 2 - 1 at the boundary);
* the decoder clamps its input latent softly (tanh(z / 3) * 3) and does NOT clamp its output (slightly beyond
  [-1, 1], as diffusers); ``images.tensor_to_pil`` clamps when the picture is made.
TAESD (SD1/SD2) and TAESDXL have identical shapes: the caller must pick the right file for the family.

Sources: https://github.com/madebyollin/taesd/blob/main/taesd.py and diffusers
``models/autoencoders/vae.py`` (EncoderTiny, DecoderTiny), ``scripts/convert_tiny_autoencoder_to_diffusers.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdcli.models.invariant import PointwiseConv, tanh
from sdcli.runtime.errors import BadInputError, NumericalError, UsageError

ENCODER_BLOCKS = (1, 3, 3, 3)  # Blocks after the input conv, then after each stride-2 conv
DECODER_BLOCKS = (3, 3, 3, 1)  # Blocks before each upsample, then the last Block
ENCODER_LAST = 1 + sum(ENCODER_BLOCKS) + len(ENCODER_BLOCKS) - 1  # 14: the conv to latent channels
DECODER_LAST = 3 + sum(DECODER_BLOCKS) + 2 * (len(DECODER_BLOCKS) - 1)  # 19: the conv to RGB

# diffusers AutoencoderTiny prefix -> (our part, index shift added to the layer number): data, not code.
DIFFUSERS_RENAMES = {"encoder.layers.": ("encoder", 0), "decoder.layers.": ("decoder", 1)}

_ORIGINAL_KEY = re.compile(r"^\d+\.")  # every key of an original file starts with its Sequential index


def _conv(n_in: int, n_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kw)


class Clamp(nn.Module):
    """Soft clamp of the incoming latent to (-3, 3)."""

    def forward(self, x: Tensor) -> Tensor:
        return tanh(x / 3, inplace=True) * 3  # thread-count invariant (invariant.py)


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus a skip (1x1 without bias when the width changes), then ReLU."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out))
        self.skip = PointwiseConv(n_in, n_out, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Sequential):
    """Image in [0, 1] (B, 3, H, W) -> scaled latent (B, C, H/8, W/8)."""

    def __init__(self, latent_channels: int = 4, width: int = 64):
        layers: list[nn.Module] = []
        for level, n_blocks in enumerate(ENCODER_BLOCKS):
            layers.append(_conv(3, width) if level == 0 else _conv(width, width, stride=2, bias=False))
            layers += [Block(width, width) for _ in range(n_blocks)]
        layers.append(_conv(width, latent_channels))
        super().__init__(*layers)


class TinyDecoder(nn.Sequential):
    """Scaled latent (B, C, h, w) -> image in about [0, 1] (B, 3, 8h, 8w); index 0 is the clamp."""

    def __init__(self, latent_channels: int = 4, width: int = 64):
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, width), nn.ReLU()]
        for level, n_blocks in enumerate(DECODER_BLOCKS):
            layers += [Block(width, width) for _ in range(n_blocks)]
            if level < len(DECODER_BLOCKS) - 1:
                layers += [nn.Upsample(scale_factor=2), _conv(width, width, bias=False)]
        layers.append(_conv(width, 3))
        super().__init__(*layers)


class TinyAutoencoder(nn.Module):
    """TAESD with either part possibly absent (a lone ``taesd_decoder`` file is enough to decode)."""

    def __init__(self, encoder: TinyEncoder | None, decoder: TinyDecoder | None, latent_channels: int):
        super().__init__()
        self.encoder, self.decoder, self.latent_channels = encoder, decoder, latent_channels

    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def encode(self, x: Tensor) -> Tensor:
        """Image in [-1, 1] (B, 3, H, W) -> scaled latent (B, C, H/8, W/8): diffusers' ``encode().latents``."""
        if self.encoder is None:
            raise UsageError("this TAESD has no encoder: give the taesd encoder file too")
        return self.encoder(x.to(self._dtype()).add(1).div(2))

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent (B, C, h, w) -> image in about [-1, 1], unclamped: diffusers' ``decode().sample``."""
        if self.decoder is None:
            raise UsageError("this TAESD has no decoder: give the taesd decoder file")
        return self.decoder(z.to(self._dtype())).mul(2).sub(1)


# ----------------------------------------------------------------------------------------------------------
# Header-only detection: each predicate takes {key: shape}


def shapes_of(header: dict) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a safetensors header (``checkpoint.read_header``) or a state dict of tensors."""
    return {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v["shape"])
            for k, v in header.items() if k != "__metadata__"}  # fmt: skip


def _all_original(shapes: dict) -> bool:
    return bool(shapes) and all(_ORIGINAL_KEY.match(k) for k in shapes)


def is_taesd_decoder(shapes: dict[str, tuple[int, ...]]) -> bool:
    """An original-layout decoder file: only ``N.…`` keys, a latent->width conv at 1 and a width->RGB conv at 19."""
    first, last = shapes.get("1.weight", ()), shapes.get(f"{DECODER_LAST}.weight", ())
    return (_all_original(shapes) and "0.weight" not in shapes and len(first) == 4 and first[2:] == (3, 3)
            and len(last) == 4 and last[0] == 3 and last[1] == first[0])  # fmt: skip


def is_taesd_encoder(shapes: dict[str, tuple[int, ...]]) -> bool:
    """An original-layout encoder file: an RGB->width conv at 0 and a width->latent conv at 14."""
    first, last = shapes.get("0.weight", ()), shapes.get(f"{ENCODER_LAST}.weight", ())
    return (_all_original(shapes) and len(first) == 4 and first[1] == 3 and first[2:] == (3, 3)
            and len(last) == 4 and last[1] == first[0])  # fmt: skip


def is_autoencoder_tiny(shapes: dict[str, tuple[int, ...]]) -> bool:
    """A diffusers ``AutoencoderTiny`` file: every key under ``encoder.layers.`` / ``decoder.layers.``, and the
    telltale first/last convs of at least one part."""
    if not shapes or not all(k.startswith(tuple(DIFFUSERS_RENAMES)) for k in shapes):
        return False
    parts = _split_diffusers(shapes)
    return is_taesd_encoder(parts["encoder"]) or is_taesd_decoder(parts["decoder"])


def is_taesd(shapes: dict[str, tuple[int, ...]]) -> bool:
    return is_taesd_decoder(shapes) or is_taesd_encoder(shapes) or is_autoencoder_tiny(shapes)


def _split_diffusers(state: dict) -> dict[str, dict]:
    """diffusers keys -> {"encoder": {original key: v}, "decoder": {...}} by DIFFUSERS_RENAMES."""
    parts: dict[str, dict] = {"encoder": {}, "decoder": {}}
    for key, value in state.items():
        for prefix, (part, shift) in DIFFUSERS_RENAMES.items():
            if key.startswith(prefix):
                index, _, rest = key[len(prefix):].partition(".")
                name = f"{int(index) + shift}.{rest}" if index.isdigit() else key  # a stray name stays unexpected
                parts[part][name] = value
    return parts


# ----------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class TaesdParts:
    """What one file holds, in original key names: encoder and/or decoder state (tensors)."""

    path: Path
    encoder: dict[str, Tensor] | None
    decoder: dict[str, Tensor] | None


def _read_state(path: Path) -> dict[str, Tensor]:
    from sdcli.formats.pickle_ckpt import PICKLE_SUFFIXES, load_ckpt
    from sdcli.formats.safetensors import read_header

    if path.suffix.lower() in PICKLE_SUFFIXES:
        return load_ckpt(path)  # restricted unpickler: tensors only, no code runs
    read_header(path)  # one-line errors for empty, truncated, HTML, LFS-pointer and pickle-renamed files
    from safetensors.torch import load_file

    return load_file(str(path))


def read_taesd_file(path: str | Path) -> TaesdParts:
    """Split a TAESD file (original encoder or decoder, or diffusers AutoencoderTiny) into its parts."""
    path = Path(path)
    state = _read_state(path)
    shapes = shapes_of(state)
    if is_taesd_decoder(shapes):
        return TaesdParts(path, None, state)
    if is_taesd_encoder(shapes):
        return TaesdParts(path, state, None)
    if is_autoencoder_tiny(shapes):
        parts = _split_diffusers(state)
        return TaesdParts(path, parts["encoder"] or None, parts["decoder"] or None)
    raise BadInputError(f"{path}: not a TAESD file (expected taesd_encoder/taesd_decoder keys 0..19 or diffusers "
                        f"AutoencoderTiny encoder.layers./decoder.layers. keys)")  # fmt: skip


def _listing(items: list[str], limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _check_strict(path: Path, part: str, module: nn.Module, state: dict[str, Tensor]) -> None:
    """One error listing missing, unexpected and mis-shaped keys (original names), and non-float tensors."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    wrong = sorted(f"{k} {list(state[k].shape)} != {list(s)}" for k, s in expected.items()
                   if k in state and tuple(state[k].shape) != s)  # fmt: skip
    not_float = sorted(f"{k} is {state[k].dtype}" for k in state if not state[k].is_floating_point())
    problems = [f"{what}: {_listing(items)}" for what, items in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong),
                 ("not floating point", not_float)) if items]  # fmt: skip
    if problems:
        raise BadInputError(f"{path}: TAESD {part} weights do not match the model: " + "; ".join(problems))
    bad = sorted(k for k, t in state.items() if not bool(torch.isfinite(t).all()))
    if bad:
        raise NumericalError(f"{path}: NaN or Inf in the TAESD {part} weights {_listing(bad)}")


def _build(cls: type, part: str, found: tuple[Path, dict[str, Tensor]] | None, dtype: torch.dtype,
           device: torch.device) -> nn.Module | None:  # fmt: skip
    """The part built on the meta device with the width and latent channels its weights show, then filled."""
    if found is None:
        return None
    path, state = found
    first = state.get("1.weight" if part == "decoder" else "0.weight")
    last = state.get(f"{ENCODER_LAST}.weight")
    width = first.shape[0] if first is not None and first.dim() == 4 else 64
    latent_source, axis = (first, 1) if part == "decoder" else (last, 0)
    latent = latent_source.shape[axis] if latent_source is not None and latent_source.dim() == 4 else 4
    with torch.device("meta"):
        module = cls(latent, width)
    _check_strict(path, part, module, state)
    state = {k: t.to(device=device, dtype=dtype) for k, t in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    return module.requires_grad_(False).eval()


def load_taesd(*paths: str | Path, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> TinyAutoencoder:  # fmt: skip
    """A TinyAutoencoder from one or more files: a diffusers AutoencoderTiny file (both parts), or original
    ``taesd[xl]_decoder`` and/or ``taesd[xl]_encoder`` files (.safetensors, or .pth read by the restricted
    loader). Strict: any missing, unexpected or mis-shaped key is listed in one BadInputError."""
    found: dict[str, tuple[Path, dict[str, Tensor]]] = {}
    for path in paths:
        parts = read_taesd_file(path)
        for part in ("encoder", "decoder"):
            state = getattr(parts, part)
            if state is None:
                continue
            if part in found:
                raise UsageError(f"two TAESD {part}s given: {found[part][0]} and {parts.path}")
            found[part] = (parts.path, state)
    if not found:
        raise UsageError("no TAESD file given")
    device = torch.device(device)
    encoder = _build(TinyEncoder, "encoder", found.get("encoder"), dtype, device)
    decoder = _build(TinyDecoder, "decoder", found.get("decoder"), dtype, device)
    channels = {encoder[-1].out_channels} if encoder is not None else set()
    channels |= {decoder[1].in_channels} if decoder is not None else set()
    if len(channels) != 1:
        raise BadInputError(f"TAESD encoder and decoder disagree on latent channels ({sorted(channels)}): "
                            f"{found['encoder'][0]}, {found['decoder'][0]}")  # fmt: skip
    return TinyAutoencoder(encoder, decoder, channels.pop())

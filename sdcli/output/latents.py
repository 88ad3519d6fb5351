"""Latent and embedding files. This docstring is the specification (docs/file-formats.md repeats it).

Both are safetensors files (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header, then raw tensor bytes. Metadata values are strings (a safetensors rule).

sdcli latent (any name except *.latent), format version 1:
  tensor   "latent"        float32 (N, C, H/8, W/8): C = 4 (SD 1.x/2.x, SDXL) or 16 (SD3, FLUX)
  metadata "format"        "sdcli.latent"
           "version"       "1"
           "family"        model family the VAE belongs to, e.g. "sd1", "sd2", "sdxl" ("" if unknown)
           "scaled"        "true": the tensor is in UNet space ((VAE output - shift_factor) * scale_factor);
                           "false": raw VAE space
           "scale_factor"  the VAE scale factor as a decimal string, e.g. "0.18215" ("" if unknown)
           "shift_factor"  only for a VAE that centres its latent (SD3 "0.0609", FLUX "0.1159"); absent: 0
           "source_size"   "WxH" of the image it came from, or ""
           "model_hash"    sha256 (hex) of the checkpoint/VAE used, or ""

ComfyUI latent (name ends in ".latent"), as SaveLatent/LoadLatent in ComfyUI's nodes.py:
  tensor "latent_tensor"            (N, 4, H/8, W/8)
  tensor "latent_format_version_0"  empty marker tensor
  With the marker, latent_tensor is in raw VAE space: ComfyUI's LATENT type is *unscaled*, the model's
  latent_format.process_in multiplies by the scale factor just before sampling (comfy/latent_formats.py).
  Files without the marker (an older ComfyUI) hold the scaled tensor: LoadLatent multiplies them by
  1 / 0.18215 to get raw VAE space, and so do we. Our own metadata keys are added too (ComfyUI ignores them).

sdcli embedding (CLIP text conditioning), format version 1:
  tensor   "cond"          float32 (1, 77*k, D): the text encoder's hidden states for k 77-token chunks
  tensor   "pooled"        optional (1, D2), the pooled text embedding (SDXL)
  metadata "format" = "sdcli.embedding", "version" = "1", "family", "prompt", "clip_skip", "model_hash"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sdcli.families import FAMILIES
from sdcli.runtime.errors import BadInputError, UsageError, quote
from sdcli.formats.safetensors_header import METADATA_KEY, decode_header
from sdcli.formats.inputs import read_input
from sdcli.output.targets import atomic_write_bytes

LATENT_FORMAT = "sdcli.latent"
EMBEDDING_FORMAT = "sdcli.embedding"
FORMAT_VERSION = "1"
COMFY_SUFFIX = ".latent"
COMFY_TENSOR = "latent_tensor"
COMFY_MARKER = "latent_format_version_0"
COMFY_LEGACY_SCALE = 0.18215  # fixed in ComfyUI's LoadLatent, whatever the model
TOKENS_PER_CHUNK = 77


@dataclass
class LatentFile:
    """A latent as stored, with what is needed to get either space.

    `latent` is exactly the stored tensor; `scaled` says which space it is in. Use `.vae_space()` for the
    VAE decoder and `.unet_space()` for the sampler rather than scaling by hand."""

    latent: torch.Tensor
    scaled: bool
    scale_factor: float | None
    family: str | None = None
    source_size: tuple[int, int] | None = None
    model_hash: str | None = None
    format: str = "sdcli"  # "sdcli", "comfyui" or "comfyui-legacy"
    metadata: dict = field(default_factory=dict)
    shift_factor: float | None = None  # None: not recorded (0, or the model's when it centres its latents)

    def _factor(self, scale_factor: float | None) -> float:
        factor = scale_factor if scale_factor is not None else self.scale_factor
        if factor is None:
            raise UsageError("this latent file does not record its VAE scale factor; the model's is needed")
        return factor

    def _shift(self, shift_factor: float | None) -> float:
        return shift_factor if shift_factor is not None else self.shift_factor or 0.0

    def vae_space(self, scale_factor: float | None = None, shift_factor: float | None = None) -> torch.Tensor:
        """The latent as the VAE encoder outputs it / the decoder expects it."""
        if not self.scaled:
            return self.latent
        shift = self._shift(shift_factor)
        return self.latent / self._factor(scale_factor) + shift if shift else self.latent / self._factor(scale_factor)

    def unet_space(self, scale_factor: float | None = None, shift_factor: float | None = None) -> torch.Tensor:
        """The latent as the sampler works on it ((VAE space - shift) * scale factor)."""
        if self.scaled:
            return self.latent
        shift = self._shift(shift_factor)
        return (self.latent - shift) * self._factor(scale_factor) if shift else self.latent * self._factor(scale_factor)


@dataclass
class EmbeddingFile:
    cond: torch.Tensor
    pooled: torch.Tensor | None
    prompt: str
    family: str | None
    clip_skip: int | None
    model_hash: str | None
    metadata: dict = field(default_factory=dict)


def _latent_channels(family: str | None) -> tuple[int, ...]:
    """The channel counts a latent of `family` may have: its family's latent declaration, or any family's when
    the file names none (or one this version does not know)."""
    known = {f.name: f.latent.channels for f in FAMILIES}
    return (known[family],) if family in known else tuple(sorted(set(known.values())))


def _check_latent(t: torch.Tensor, where: str, family: str | None = None) -> None:
    channels = _latent_channels(family)
    if t.dim() != 4 or t.shape[1] not in channels or 0 in t.shape:
        expected = " or ".join(str(c) for c in channels)
        raise BadInputError(f"{where}: latent has shape {tuple(t.shape)}, expected (N, {expected}, h, w) "
                            "with no empty dimension")  # fmt: skip
    if not t.is_floating_point():
        raise BadInputError(f"{where}: latent has dtype {t.dtype}, expected a float type")
    if not torch.isfinite(t).all():
        raise BadInputError(f"{where}: latent holds NaN or Inf values")


def _cpu32(t: torch.Tensor) -> torch.Tensor:
    """A float32, contiguous CPU copy (never the caller's tensor itself)."""
    return t.detach().to("cpu", torch.float32).contiguous().clone()


def _size_str(size: tuple[int, int] | None) -> str:
    return f"{int(size[0])}x{int(size[1])}" if size else ""


def save_latent(path, latent: torch.Tensor, *, scaled: bool, scale_factor: float, family: str,
                source_size: tuple[int, int] | None, model_hash: str | None, overwrite: bool = False,
                shift_factor: float = 0.0) -> Path:
    """Write a latent file: ComfyUI's format when `path` ends in '.latent', sdcli's otherwise (see top)."""
    _check_latent(latent, str(path), family)
    meta = {"format": LATENT_FORMAT, "version": FORMAT_VERSION, "family": family or "",
            "scaled": "true" if scaled else "false", "scale_factor": repr(float(scale_factor)),
            "source_size": _size_str(source_size), "model_hash": model_hash or ""}
    if shift_factor:
        meta["shift_factor"] = repr(float(shift_factor))
    if str(path).endswith(COMFY_SUFFIX):
        # ComfyUI stores raw VAE space next to the marker
        raw = (latent / scale_factor + shift_factor if shift_factor else latent / scale_factor) if scaled else latent
        meta["scaled"] = "false"
        tensors = {COMFY_TENSOR: _cpu32(raw), COMFY_MARKER: torch.tensor([])}
    else:
        tensors = {"latent": _cpu32(latent)}
    return atomic_write_bytes(path, st_save(tensors, metadata=meta), overwrite=overwrite)


def _sniff(data: bytes) -> str:
    """What a non-safetensors file probably is, for the error message."""
    kinds = [(b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"PK\x03\x04", "a zip/pickle checkpoint"),
             (b"\x80", "a pickle"), (b"GGUF", "a GGUF file"), (b"version https://git-lfs", "a git-LFS pointer"),
             (b"<", "an HTML/XML page")]
    for magic, kind in kinds:
        if data.lstrip()[: len(magic)] == magic:
            return kind
    return "not a safetensors file"


def _read_safetensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a small safetensors file; BadInputError naming the file otherwise."""
    p = Path(path)
    _, data = read_input(p, "a latent or embedding file")
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if n <= 0 or n + 8 > len(data) or data[8 : 8 + n].lstrip()[:1] != b"{":
        raise BadInputError(f"{p}: {'empty file' if not data else _sniff(data)}")
    header = decode_header(p, data[8 : 8 + n], len(data) - 8 - n)  # checked entry by entry before any read
    try:
        tensors = st_load(data)
    except (ValueError, SafetensorError) as exc:  # validated above: only a library stricter than us lands here
        raise BadInputError(f"{p}: broken safetensors file ({exc})") from exc
    return tensors, header.get(METADATA_KEY, {})


def _parse_size(text: str | None) -> tuple[int, int] | None:
    try:
        w, h = (text or "").lower().split("x")
        return int(w), int(h)
    except ValueError:
        return None


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def load_latent(path) -> LatentFile:
    """Read an sdcli latent file or a ComfyUI .latent file (with or without the version marker)."""
    tensors, meta = _read_safetensors(path)
    common = dict(family=meta.get("family") or None, source_size=_parse_size(meta.get("source_size")),
                  model_hash=meta.get("model_hash") or None, metadata=meta,
                  shift_factor=_float_or_none(meta.get("shift_factor")))
    if COMFY_TENSOR in tensors:
        t = tensors[COMFY_TENSOR]
        _check_latent(t, str(path), common["family"])
        if COMFY_MARKER in tensors:
            factor = _float_or_none(meta.get("scale_factor"))  # only present when sdcli wrote it
            return LatentFile(t.float(), scaled=False, scale_factor=factor, format="comfyui", **common)
        # Legacy ComfyUI file: same rule as LoadLatent, fixed SD1 factor.
        return LatentFile(t.float() * (1.0 / COMFY_LEGACY_SCALE), scaled=False, scale_factor=None,
                          format="comfyui-legacy", **common)
    if "latent" not in tensors:
        raise BadInputError(f"{path}: no 'latent' or 'latent_tensor' tensor (has: {', '.join(sorted(tensors))})")
    if meta.get("format") not in (None, LATENT_FORMAT):
        raise BadInputError(f"{path}: format {quote(repr(meta.get('format')), 60)} is not a latent file")
    t = tensors["latent"]
    _check_latent(t, str(path), common["family"])
    scaled = meta.get("scaled", "true").lower() == "true"
    return LatentFile(t.float(), scaled=scaled, scale_factor=_float_or_none(meta.get("scale_factor")),
                      format="sdcli", **common)


def load_init_latent(path, runs: list[tuple[int, int]]) -> LatentFile:
    """A --latent-in file, checked against each job's (n, batch_size) before the model loads: every batch starts
    from all its latents or from the one latent, so N latents need batches of exactly N."""
    lf = load_latent(path)
    count = lf.latent.shape[0]
    for n, batch_size in runs:
        if count != 1 and (batch_size != count or n % count):
            raise UsageError(f"{path} holds {count} latents, but this run makes {n} image(s) in batches of "
                             f"{batch_size}: use --batch-size {count} with -n a multiple of {count}, "
                             "or a file of one latent")  # fmt: skip
    return lf


def save_embedding(path, cond: torch.Tensor, *, prompt: str, family: str, clip_skip: int, model_hash,
                   pooled: torch.Tensor | None = None, overwrite: bool = False) -> Path:
    """Write CLIP conditioning (1, 77*k, D) [+ pooled (1, D2)] with its prompt and model (see top)."""
    _check_cond(cond, str(path))
    meta = {"format": EMBEDDING_FORMAT, "version": FORMAT_VERSION, "family": family or "",
            "prompt": prompt, "clip_skip": "" if clip_skip is None else str(int(clip_skip)),
            "model_hash": model_hash or ""}
    tensors = {"cond": _cpu32(cond)}
    if pooled is not None:
        tensors["pooled"] = _cpu32(pooled)
    return atomic_write_bytes(path, st_save(tensors, metadata=meta), overwrite=overwrite)


def _check_cond(t: torch.Tensor, where: str) -> None:
    if t.dim() != 3 or t.shape[1] == 0 or t.shape[1] % TOKENS_PER_CHUNK != 0:
        raise BadInputError(f"{where}: embedding has shape {tuple(t.shape)}, expected (N, 77*k, D)")
    if not t.is_floating_point() or not torch.isfinite(t).all():
        raise BadInputError(f"{where}: embedding is not a finite float tensor")


def load_embedding(path) -> EmbeddingFile:
    """Read an sdcli embedding file; BadInputError for anything else."""
    tensors, meta = _read_safetensors(path)
    if "cond" not in tensors or meta.get("format") not in (None, EMBEDDING_FORMAT):
        raise BadInputError(f"{path}: not an sdcli embedding file (tensors: {', '.join(sorted(tensors))})")
    _check_cond(tensors["cond"], str(path))
    clip_skip = meta.get("clip_skip")
    return EmbeddingFile(cond=tensors["cond"].float(), pooled=tensors.get("pooled"), prompt=meta.get("prompt", ""),
                         family=meta.get("family") or None,
                         clip_skip=int(clip_skip) if clip_skip and clip_skip.lstrip("-").isdigit() else None,
                         model_hash=meta.get("model_hash") or None, metadata=meta)

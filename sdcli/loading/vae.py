"""Which VAE a file is, and loading it: a full AutoencoderKL (checkpoint's own, a standalone file or a diffusers
vae folder) or TAESD / TAESDXL, the tiny autoencoder (models/taesd.py), told apart from the header alone.

TAESD works on the SCALED latents the UNet sees (its `latent_scale` is 1, the full VAE's is the family's), so
pipeline.decode_latents / encode_image divide or multiply by `latent_scale(vae, family)` and nothing else needs to
know which VAE it holds.

TAESD (SD1/SD2) and TAESDXL have the same shapes; the file's name says which it is (madebyollin's files are
``taesd_*`` and ``taesdxl_*``; a diffusers folder is named after the repo), and a family declares which one fits it
(``LatentSpec.taesd``). A name that says neither is taken on trust; its latent channels are still checked.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdcli.runtime.errors import BadInputError, ModelNotFoundError
from sdcli.families.shapes import infer_vae_config
from sdcli.formats.diffusers import standalone_vae_source
from sdcli.formats.ldm import VAE_PREFIX, shapes_of
from sdcli.formats.source import WeightSource
from sdcli.formats.strict import identity_plan, load_part
from sdcli.models.vae import AutoencoderKL, VAEConfig

# longest first: "taesdxl_decoder" also starts with "taesd"; taesd3 (SD3) and taef1 (FLUX) are 16-channel
TAESD_KINDS = ("taesdxl", "taesd3", "taesd", "taef1")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def tiny_file(path: Path) -> Path | None:
    """The TAESD weights `path` names (itself, or a diffusers AutoencoderTiny folder's file), or None when it is
    not a TAESD file. Header only for safetensors; a pickle is taken on its name (load_taesd checks its keys)."""
    from sdcli.formats.gguf import is_gguf, read_gguf_header
    from sdcli.formats.pickle_ckpt import PICKLE_SUFFIXES
    from sdcli.formats.safetensors import read_header
    from sdcli.models.taesd import is_taesd, shapes_of

    if path.is_dir():
        path = path / DIFFUSERS_WEIGHTS
        if not path.is_file():
            return None
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return path if path.name.lower().startswith(TAESD_KINDS) else None
    if is_gguf(path):  # stable-diffusion.cpp / city96 VAE files: a full VAE (load_vae dequantizes what is quantized)
        return path if is_taesd({name: tuple(t.shape) for name, t in read_gguf_header(path).tensors.items()}) else None
    return path if is_taesd(shapes_of(read_header(path))) else None


def taesd_kind(path: Path) -> str | None:
    """"taesd" or "taesdxl" from the file's (or its diffusers folder's) name; None when the name says neither."""
    for name in (path.name.lower(), path.parent.name.lower()):
        kind = next((k for k in TAESD_KINDS if name.startswith(k)), None)
        if kind:
            return kind
    return None


def _sibling_encoder(decoder: Path) -> Path | None:
    """madebyollin ships taesd_encoder next to taesd_decoder: found by name, so img2img can encode too."""
    name = decoder.name
    if "_decoder" not in name.lower():
        return None
    start = name.lower().index("_decoder")
    candidate = decoder.with_name(name[:start] + "_encoder" + name[start + len("_decoder"):])
    return candidate if candidate.is_file() else None


def load_vae_file(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  family=None):  # fmt: skip
    """A --vae file or folder: TAESD (with its sibling encoder when there is one) or a full VAE. `family`
    (families.Family, None when no model is loaded) is checked against a TAESD's name and latent channels."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such VAE file or folder")
    tiny = tiny_file(path)
    if tiny is None:
        return load_vae(path, dtype, device)
    return load_tiny(tiny, dtype, device, family)


def load_tiny(path: Path, dtype: torch.dtype, device, family=None):
    from sdcli.models.taesd import load_taesd, read_taesd_file

    if family is not None:
        check_taesd_fits(path, family)
    parts = read_taesd_file(path)
    encoder = _sibling_encoder(path) if parts.encoder is None else None
    vae = load_taesd(path, *([encoder] if encoder else []), dtype=dtype, device=device)
    if family is not None and vae.latent_channels != family.latent.channels:
        raise BadInputError(f"{path}: TAESD with {vae.latent_channels} latent channels; {family.title} latents have "
                            f"{family.latent.channels}")  # fmt: skip
    vae.source = path
    return vae


def latent_channels(vae) -> int:
    """The channels of the latents `vae` decodes (TAESD or the full AutoencoderKL)."""
    return vae.latent_channels if is_tiny(vae) else vae.config.embed_dim


def check_taesd_fits(path: Path, family) -> None:
    """TAESD for SD1/SD2, TAESDXL for SDXL: the shapes cannot tell, the name can."""
    kind = taesd_kind(path)
    if kind is not None and kind != family.latent.taesd:
        raise BadInputError(f"{path}: a {kind} file; {family.title} latents need {family.latent.taesd}")


def latent_scale(vae, family) -> float:
    """What the VAE's own latent is multiplied by to give the UNet's (scaled) latent: 1 for TAESD."""
    return 1.0 if is_tiny(vae) else family.latent.scale_factor


def latent_shift(vae, family) -> float:
    """What is taken from the VAE's own latent before the scale (the 16-channel VAEs'): 0 for TAESD."""
    return 0.0 if is_tiny(vae) else family.latent.shift_factor


def is_tiny(vae) -> bool:
    from sdcli.models.taesd import TinyAutoencoder

    return isinstance(vae, TinyAutoencoder)


def find_preview_decoder(vae_dir: str | Path | None, family) -> Path | None:
    """The family's TAESD decoder in `vae_dir` (sub-folders too), e.g. taesd_decoder.safetensors for SD1: the live
    preview uses it when --preview-vae is not given. None when there is no such folder or file."""
    if not vae_dir or not Path(vae_dir).expanduser().is_dir():
        return None
    root = Path(vae_dir).expanduser()
    for suffix in (".safetensors", ".pth"):
        found = sorted(p for p in root.rglob(f"{family.latent.taesd}_decoder{suffix}") if p.is_file())
        if found:
            return found[0]
    return None

def vae_part(source: WeightSource, cfg: VAEConfig) -> tuple:
    with torch.device("meta"):
        module = AutoencoderKL(cfg)
    return ("VAE", module, source, *identity_plan(list(source.entries), VAE_PREFIX))


def build_vae(source: WeightSource, cfg: VAEConfig, dtype: torch.dtype, device: torch.device) -> AutoencoderKL:
    """The VAE runs on plain weights: a GGUF's quantized ones (stable-diffusion.cpp files) are dequantized here."""
    return load_part(*vae_part(source, cfg), dtype, device, quantized=False)


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKL:
    """A standalone VAE file (e.g. vae-ft-mse-840000-ema-pruned.safetensors) or a diffusers vae folder."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such VAE file or folder")
    source = standalone_vae_source(path)
    try:
        cfg = infer_vae_config(shapes_of(source.header))
        return build_vae(source, cfg, dtype, torch.device(device))
    except BadInputError as e:  # shape inference sees only names: say which file they came from
        raise e if str(path) in str(e) else BadInputError(f"{path}: {e}") from None
    finally:
        source.close()

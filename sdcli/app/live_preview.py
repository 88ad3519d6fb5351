"""The sampler's per-step callback of a render: the progress bar, --preview's live picture (written by
output/preview.PreviewWriter, drawn by a TAESD decoder when there is one, else by the family's cheap latent-to-RGB
estimate), and the request's own on_step hook (the server's progress and interrupt)."""

from __future__ import annotations

from pathlib import Path

from sdcli.runtime import console
from sdcli.runtime.errors import UsageError


def step_callback(progress, req, models, vae_dir: str | None):
    """The sampler callback: progress, the live preview when asked for, and the request's own `on_step` hook
    (the server's: its progress and interrupt; any may be absent)."""
    from sdcli.output.preview import PreviewWriter

    latent = models.family.latent
    preview = req.preview
    writer = PreviewWriter(preview, getattr(req, "preview_interval", 0.5), rgb_factors=latent.rgb_factors,
                           downscale=latent.downscale, rgb_bias=latent.rgb_bias,
                           decoder=decoder(models, getattr(req, "preview_vae", None), vae_dir)) \
        if preview else None
    callbacks = [c for c in (progress, writer, getattr(req, "on_step", None)) if c is not None]
    if len(callbacks) < 2:
        return callbacks[0] if callbacks else None
    return lambda *args: [c(*args) for c in callbacks]


def decoder(models, preview_vae: str | None, vae_dir: str | None):
    """The TAESD the live preview decodes with: --preview-vae, else the family's taesd decoder in vae_dir, else the
    render's own VAE when it is a TAESD; None for the cheap linear estimate. Loaded once per run."""
    from sdcli.loading import vae as vae_files

    path = preview_vae or vae_files.find_preview_decoder(vae_dir, models.family)
    if path is None:
        return models.vae if models.vae_is_tiny else None
    key = (str(path), models.dtype, models.device, models.family.name)
    if key not in _DECODERS:
        _DECODERS.clear()  # one run, one preview decoder
        _DECODERS[key] = _load_decoder(str(path), models.dtype, models.device, models.family)
    return _DECODERS[key]


_DECODERS: dict = {}


def _load_decoder(path: str, dtype, device, family):
    from sdcli.loading import vae as vae_files

    vae = vae_files.load_vae_file(path, dtype, device, family)
    if not vae_files.is_tiny(vae):
        raise UsageError(f"--preview-vae {path}: not a TAESD decoder (taesd_decoder.safetensors, taesdxl_decoder...)")
    console.info(f"preview: decoded by {Path(path).name}")
    return vae

"""Models from checkpoint files: detection from the header alone, then a strict load of UNet, VAE and text encoder.

Every layout is first seen through one lens, the LDM single-file key names (formats/ldm.py): a diffusers folder is
mapped onto them by formats/diffusers.py, so detection and loading never care which layout they came from. The
family registry (families/) says which family the header shapes are; the shapes say the network sizes. Each part is
then split off by prefix, renamed to the module's own names (identity for UNet/VAE, OpenCLIP -> CLIPTextModel for
SD2), built on the meta device and loaded strictly with ``assign=True``, cast once to the run dtype.

How sd.cpp and A1111 tell variants apart: https://github.com/leejet/stable-diffusion.cpp/blob/master/model.cpp
(get_sd_version) and AUTOMATIC1111 modules/sd_models_config.py (guess_model_config_from_state_dict).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdcli.errors import BadInputError, ModelNotFoundError, UnsupportedModelError
from sdcli.families import Family, by_name, detect_family
from sdcli.families.shapes import infer_text_config, infer_unet_config, infer_vae_config
from sdcli.formats.clip_layouts import text_plan
from sdcli.formats.diffusers import standalone_vae_source
from sdcli.formats.hub import resolve_model
from sdcli.formats.ldm import UNET_PREFIX, VAE_PREFIX, numel, part_of, shapes_of
from sdcli.formats.pickle_ckpt import is_pickle
from sdcli.formats.safetensors import read_header
from sdcli.formats.source import WeightSource, open_source
from sdcli.formats.strict import identity_plan, is_ignored, listing, load_part
from sdcli.models.text import TextConfig, TextEncoder
from sdcli.models.unet import UNetConfig, UNetModel
from sdcli.models.vae import AutoencoderKL, VAEConfig
from sdcli.vae_files import load_vae_file


@dataclass(frozen=True)
class ModelInfo:
    family: str  # the family's name ("sd1", "sd2"): what metadata records
    prediction: str  # "eps" | "v"
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig | None
    prediction_source: str = "family"  # override | metadata | scheduler_config | family | guess | probe
    text_layout: str | None = "openai"  # "openai" (transformers names) | "openclip" (SD2 single file)
    dtypes: dict = field(default_factory=dict)  # part -> {dtype: tensor count}
    params: dict = field(default_factory=dict)  # part -> parameter count (as stored)
    ignored_keys: int = 0  # entries skipped by IGNORED_KEYS (EMA, schedule buffers, ...)
    metadata: dict = field(default_factory=dict)  # the file's __metadata__
    consistency: bool = False  # consistency-distilled (LCM): the file says so in its metadata

    @property
    def spec(self) -> Family:
        """The family's declaration (latent space, text encoders, schedule, native size...)."""
        return by_name(self.family)

    @property
    def inpaint(self) -> bool:
        """An inpainting variant: the UNet also sees the mask and the masked image's latent."""
        return self.unet.in_channels == self.spec.inpaint_in_channels

    @property
    def denoiser(self) -> str:
        """Which denoiser turns the UNet's output into x0: "eps", "v" or "lcm"."""
        return "lcm" if self.consistency else self.prediction


_PREDICTION_NAMES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v"}


def _prediction(family: Family, inpaint: bool, header: dict, override: str | None) -> tuple[str, str]:
    """(prediction, how we know): the user, then the file, then the family (which may only guess; see
    Family.settle_prediction)."""
    if override is not None:
        if override not in _PREDICTION_NAMES:
            raise BadInputError(f"unknown prediction type {override!r} (use eps or v)")
        return _PREDICTION_NAMES[override], "override"
    meta = header.get("__metadata__") or {}
    for key, source in (("sdcli.prediction_hint", "scheduler_config"), ("modelspec.prediction_type", "metadata")):
        if str(meta.get(key, "")).lower() in _PREDICTION_NAMES:
            return _PREDICTION_NAMES[str(meta[key]).lower()], source
    if "v_pred" in header:  # ComfyUI / sd.cpp marker tensor
        return "v", "metadata"
    return family.default_prediction(inpaint)


def _is_consistency(meta: dict) -> bool:
    """LCM-distilled checkpoints that say so: modelspec's architecture (".../lcm") or our own key."""
    arch = str(meta.get("modelspec.architecture", "")).lower()
    return arch.endswith("/lcm") or str(meta.get("sdcli.denoiser", "")).lower() == "lcm"


def _tally(header: dict) -> tuple[dict, dict, int]:
    """(dtypes per part, parameters per part, ignored entries) of a header."""
    dtypes: dict[str, Counter] = {}
    params: Counter = Counter()
    ignored = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if is_ignored(k):
            ignored += 1
            continue
        part = part_of(k)
        dtypes.setdefault(part, Counter())[v["dtype"]] += 1
        params[part] += numel(v["shape"])
    return {k: dict(c) for k, c in dtypes.items()}, dict(params), ignored


def detect(path_or_header: str | Path | dict, prediction: str | None = None) -> ModelInfo:
    """Family, prediction type, inpainting and network shapes, from the header alone (no tensor data read)."""
    if isinstance(path_or_header, dict):
        header = path_or_header
    else:
        path = Path(path_or_header)
        header = open_source(path).header if path.is_dir() or is_pickle(path) else read_header(path)
    shapes = shapes_of(header)
    family = detect_family(shapes)
    unet = infer_unet_config(shapes, family.unet_heads, family.name)
    text, layout = infer_text_config(shapes, family.name, family.text[0].hidden_act)
    pred, source = _prediction(family, unet.in_channels == family.inpaint_in_channels, header, prediction)
    dtypes, params, ignored = _tally(header)
    meta = dict(header.get("__metadata__") or {})
    return ModelInfo(
        family=family.name, prediction=pred, unet=unet, vae=infer_vae_config(shapes), text=text,
        prediction_source=source, text_layout=layout, dtypes=dtypes, params=params, ignored_keys=ignored,
        metadata=meta, consistency=_is_consistency(meta),
    )  # fmt: skip


@dataclass(frozen=True)
class Models:
    """One loaded checkpoint. Immutable: what changes while rendering (merged LoRAs, seamless padding) is held by
    the code that changes it (lora.LoraState, pipeline.seamless) and undone there."""

    unet: UNetModel
    vae: AutoencoderKL  # or models.taesd.TinyAutoencoder (--vae taesd_decoder...): see vae_files.latent_scale
    text_encoder: TextEncoder
    info: ModelInfo
    source: Path  # the checkpoint file or diffusers folder
    name: str  # for metadata: file stem or folder name
    vae_source: Path | None = None  # the --vae override, if any
    placement: Any = None  # device.Placement the models were loaded for (None when loaded without one)
    embeddings: Any = None  # embeddings.EmbeddingLibrary the prompts may trigger (pipeline.with_embeddings)

    @property
    def family(self) -> Family:
        return self.info.spec


def build_unet(source: WeightSource, cfg: UNetConfig, dtype: torch.dtype, device: torch.device) -> UNetModel:
    with torch.device("meta"):
        module = UNetModel(cfg)
    plan, unplaced = identity_plan(list(source.entries), UNET_PREFIX)
    return load_part("UNet", module, source, plan, unplaced, dtype, device)


def build_vae(source: WeightSource, cfg: VAEConfig, dtype: torch.dtype, device: torch.device) -> AutoencoderKL:
    with torch.device("meta"):
        module = AutoencoderKL(cfg)
    plan, unplaced = identity_plan(list(source.entries), VAE_PREFIX)
    return load_part("VAE", module, source, plan, unplaced, dtype, device)


def build_text(source: WeightSource, info: ModelInfo, dtype: torch.dtype, device: torch.device) -> TextEncoder:
    if info.text is None:
        raise BadInputError(f"{source.path}: no text encoder weights (cond_stage_model.*) in this checkpoint")
    with torch.device("meta"):
        module = TextEncoder(info.text)
    plan, unplaced = text_plan(list(source.entries), info.text_layout or "openai", info.text.num_layers)
    module = load_part("text encoder", module, source, plan, unplaced, dtype, device)
    module.reset_buffers()
    return module


def _check_leftovers(source: WeightSource) -> None:
    other = sorted(k for k in source.entries if part_of(k) == "other" and not is_ignored(k))
    if other:
        raise BadInputError(f"{source.path}: unexpected tensors outside UNet/VAE/text encoder: {listing(other)}")


def load_models(model: str | Path, vae: str | Path | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", prediction: str | None = None, placement: Any = None) -> Models:
    """Resolve, detect and strictly load UNet, VAE and text encoder of one checkpoint."""
    path = resolve_model(str(model))
    device = torch.device(device)
    source = open_source(path)
    try:
        try:
            info = detect(source.header, prediction)
        except (BadInputError, UnsupportedModelError) as e:  # detection sees only a header: name the file
            raise type(e)(f"{path}: {e}") from None
        _check_leftovers(source)
        unet = build_unet(source, info.unet, dtype, device)
        text = build_text(source, info, dtype, device)
        vae_model = load_vae_file(vae, dtype, device, info.spec) if vae is not None else \
            build_vae(source, info.vae, dtype, device)  # fmt: skip
    finally:
        source.close()
    if info.prediction_source == "guess":  # the family's default was a guess: its probe settles it
        info = dataclasses.replace(info, prediction=info.spec.settle_prediction(unet), prediction_source="probe")
    name = path.name if path.is_dir() else path.stem
    vae_path = Path(vae) if vae is not None else None
    return Models(unet, vae_model, text, info, path, name, vae_path, placement)


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

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

from sdcli.runtime.errors import BadInputError, ModelNotFoundError, UnsupportedModelError, UsageError
from sdcli.families import Family, by_name, detect_family, hub_patterns
from sdcli.families.shapes import build_denoiser, infer_denoiser_config, infer_text_config, infer_vae_config
from sdcli.formats.clip_layouts import text_plan
from sdcli.formats.diffusers import open_source, standalone_vae_source
from sdcli.formats.gguf import is_gguf
from sdcli.formats.hub import resolve_model
from sdcli.formats.ldm import UNET_PREFIX, VAE_PREFIX, bare_denoiser, numel, part_of, shapes_of
from sdcli.formats.pickle_ckpt import is_pickle
from sdcli.formats.safetensors import read_header
from sdcli.formats.source import WeightSource
from sdcli.formats.strict import check_part, identity_plan, is_ignored, listing, load_part
from sdcli.models.text import TextConfig, TextEncoder
from sdcli.models.unet import UNetModel
from sdcli.models.vae import AutoencoderKL, VAEConfig
from sdcli.loading import components
from sdcli.loading import vae as vae_files
from sdcli.loading.residency import Residency, home_of, stamps
from sdcli.loading.vae import build_vae, load_vae_file, vae_part


@dataclass(frozen=True)
class ModelInfo:
    family: str  # the family's name ("sd1", "sd2"): what metadata records
    prediction: str  # "eps" | "v" | "flow"
    unet: Any  # the denoiser's config: UNetConfig, MMDiTConfig or FluxConfig (Family.denoiser says which)
    vae: VAEConfig | None  # None: the file holds no VAE (a separate one is needed: --vae)
    # one per text encoder the family declares (families/base.TextEncoderSpec): TextConfig (CLIP) or T5Config,
    # None where the file holds none of it (given later by its own file, or optional); () when it holds no text
    texts: tuple
    prediction_source: str = "family"  # override | metadata | scheduler_config | family | guess | probe
    # per text encoder: (layout, where its weights sit): "openai" (transformers names) | "openclip" (SD2/SDXL files)
    # | "t5"; None beside a None config
    text_places: tuple = ()
    dtypes: dict = field(default_factory=dict)  # part -> {dtype: tensor count}
    params: dict = field(default_factory=dict)  # part -> parameter count (as stored)
    ignored_keys: int = 0  # entries skipped by IGNORED_KEYS (EMA, schedule buffers, ...)
    metadata: dict = field(default_factory=dict)  # the file's __metadata__
    consistency: bool = False  # consistency-distilled (LCM): the file says so in its metadata

    @property
    def text(self) -> TextConfig | None:
        """The first text encoder's config (the only one before SDXL)."""
        return self.texts[0] if self.texts else None

    @property
    def text_layout(self) -> str | None:
        return self.text_places[0][0] if self.text_places else None

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


_PREDICTION_NAMES = {"eps": "eps", "epsilon": "eps", "v": "v", "v_prediction": "v", "v-prediction": "v",
                     "flow": "flow"}


def _prediction(family: Family, inpaint: bool, header: dict, override: str | None) -> tuple[str, str]:
    """(prediction, how we know): the user, then the file, then the family (which may only guess; see
    Family.settle_prediction). A flow family predicts flow whatever is asked."""
    if override is not None and (override == "flow") != (family.flow is not None):
        raise UsageError(f"--prediction {override}: a {family.title} model predicts "
                         f"{'flow' if family.flow else 'eps or v'}")
    if override is not None:
        if override not in _PREDICTION_NAMES:
            raise BadInputError(f"unknown prediction type {override!r} (use eps or v)")
        return _PREDICTION_NAMES[override], "override"
    if family.flow is not None:
        return family.default_prediction(inpaint)
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


def _check_text_places(shapes: dict, family: Family) -> None:
    """Text-encoder weights where the family has none (SD-Turbo's sgm layout on an SD 2.x UNet, a mixed file):
    refused by name rather than silently left out."""
    roots = tuple({spec.prefix.rsplit(".", 2)[0] + "." for spec in family.text})
    stray = sorted(k for k in shapes if part_of(k) == "text" and not k.startswith(roots) and not is_ignored(k))
    if stray:
        raise UnsupportedModelError(f"text-encoder weights where a {family.title} checkpoint has none ("
                                    f"{listing(stray)}): a layout other than SD 1.x/2.x/SDXL as sdcli knows them")


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


def detect(path_or_header: str | Path | dict, prediction: str | None = None, family: Family | None = None) -> ModelInfo:
    """Family, prediction type, inpainting and network shapes, from the header alone (no tensor data read).
    `family`: already known from the checkpoint alone (text encoder files merged in since cannot change it: an SDXL
    UNet given only --clip-l would otherwise look like a refiner, whose one encoder sits where CLIP-L does)."""
    if isinstance(path_or_header, dict):
        header = path_or_header
    else:
        path = Path(path_or_header)
        if path.is_dir() or is_pickle(path) or is_gguf(path):
            header = open_source(path).header
        else:  # a diffusion transformer saved alone is seen under model.diffusion_model. (formats/ldm.py)
            header = read_header(path)
            if bare_denoiser(k for k in header if k != "__metadata__"):
                header = {(k if k == "__metadata__" else UNET_PREFIX + k): v for k, v in header.items()}
    shapes = shapes_of(header)
    family = family or detect_family(shapes)
    _check_text_places(shapes, family)
    unet = infer_denoiser_config(shapes, family)
    found = [infer_text_config(shapes, family.name, spec) for spec in family.text]
    texts, places = _texts(family, found)
    pred, source = _prediction(family, unet.in_channels == family.inpaint_in_channels, header, prediction)
    dtypes, params, ignored = _tally(header)
    meta = dict(header.get("__metadata__") or {})
    vae = infer_vae_config(shapes) if any(k.startswith(VAE_PREFIX) for k in shapes) else None
    return ModelInfo(
        family=family.name, prediction=pred, unet=unet, vae=vae, texts=texts,
        prediction_source=source, text_places=places,
        dtypes=dtypes, params=params, ignored_keys=ignored,
        metadata=meta, consistency=_is_consistency(meta),
    )  # fmt: skip


def _texts(family: Family, found: list) -> tuple[tuple, tuple]:
    """(configs, places) aligned with the family's text encoders, None where absent; both () when the file holds
    none. A family whose encoders have no option of their own (SD1, SDXL) needs all of them in the file."""
    if all(cfg is None for cfg, _, _ in found):
        return (), ()
    missing = [spec.prefix for spec, (cfg, _, _) in zip(family.text, found) if cfg is None and not spec.flag]
    if missing:
        raise BadInputError(f"{family.title} needs {len(found)} text encoders; missing: {', '.join(missing)}*")
    return (tuple(cfg for cfg, _, _ in found),
            tuple((layout, p) if layout else None for _, layout, p in found))


@dataclass(frozen=True)
class Models:
    """One loaded checkpoint. Its networks are held by `parts` (residency.Residency): `unet`, `vae` and
    `text_encoders` build a part that is not in memory when asked for; `stage(part)` says a stage that runs it
    starts. What changes modules while rendering (merged LoRAs, seamless padding) is held by the code that
    changes it (lora.LoraState, pipeline.seamless), which watches the residency so a rebuilt part gets it too."""

    parts: Residency
    info: ModelInfo
    source: Path  # the checkpoint file or diffusers folder
    name: str  # for metadata: file stem or folder name
    vae_source: Path | None = None  # the --vae override, if any
    placement: Any = None  # device.Placement the models were loaded for (None when loaded without one)
    embeddings: Any = None  # embeddings.EmbeddingLibrary the prompts may trigger (pipeline.with_embeddings)
    vae_is_tiny: bool = False  # the VAE is a TAESD (--vae taesd_decoder...): known from the header, not built

    @property
    def unet(self) -> UNetModel:
        return self.parts.get("unet")

    @property
    def vae(self) -> AutoencoderKL:  # or models.taesd.TinyAutoencoder: see vae_files.latent_scale
        return self.parts.get("vae")

    @property
    def text_encoders(self) -> tuple[TextEncoder, ...]:
        """In the family's order (SDXL: CLIP-L, bigG)."""
        return self.parts.get("text")

    @property
    def text_encoder(self) -> TextEncoder:
        """The first text encoder (the only one before SDXL)."""
        return self.text_encoders[0]

    def stage(self, part: str):
        """A stage running `part` ("text", "unet", "vae") starts: the part, ready on the run's device."""
        return self.parts.stage(part)

    @property
    def device(self) -> torch.device:
        """The device the stages run on (under offload on CUDA, idle parts wait in CPU RAM)."""
        return self.parts.device

    @property
    def dtype(self) -> torch.dtype:
        """The run's dtype (the UNet's and the text encoders'; see vae_dtype for the VAE's)."""
        return self.parts.dtype

    @property
    def family(self) -> Family:
        return self.info.spec


def _unet_part(source: WeightSource, info: ModelInfo) -> tuple:
    with torch.device("meta"):
        module = build_denoiser(info.spec.denoiser, info.unet)
    return ("UNet" if info.spec.denoiser == "unet" else "diffusion model", module, source,
            *identity_plan(list(source.entries), UNET_PREFIX))


def _text_module(cfg, layout: str):
    """The encoder a config describes, on the meta device: T5 (models/t5.py) or CLIP (models/text.py)."""
    from sdcli.models.t5 import T5Encoder

    with torch.device("meta"):
        return T5Encoder(cfg) if layout == "t5" else TextEncoder(cfg)


def _text_parts(source: WeightSource, info: ModelInfo) -> list[tuple]:
    """(name, module, source, plan, unplaced) of each text encoder in the file; an optional one that is absent is
    left out (its place in `encoders` stays None). A missing one is refused: exit 4 naming its option when it
    has one, else exit 3."""
    family = info.spec
    needed = [spec for spec in family.text if not spec.optional]
    if not info.texts and not any(spec.flag for spec in needed):
        where = ", ".join(spec.prefix + "*" for spec in family.text)
        raise BadInputError(f"{source.path}: no text encoder weights ({where}) in this checkpoint")
    texts = info.texts or (None,) * len(family.text)
    places = info.text_places or (None,) * len(family.text)
    out = []
    for n, (spec, cfg, place) in enumerate(zip(family.text, texts, places)):
        if cfg is None:
            if spec.optional:
                continue
            raise components.missing_encoder(family, spec, source.path)
        layout, prefix = place
        if layout == "t5":
            plan, unplaced = components.t5_plan(list(source.entries), prefix)
        else:
            plan, unplaced = text_plan(list(source.entries), layout, cfg.num_layers, src=prefix.removesuffix("text_model."))
            if cfg.projection_dim is None:  # a projection the family does not use (SD3's, FLUX's CLIP-L)
                plan.pop("text_projection.weight", None)
        name = "text encoder" if len(family.text) == 1 else f"text encoder {n + 1}"
        out.append((name, _text_module(cfg, layout), source, plan, unplaced))
    return out


def build_unet(source: WeightSource, info: ModelInfo, dtype: torch.dtype, device: torch.device):
    return load_part(*_unet_part(source, info), dtype, device)


def text_dtype(module, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """T5 overflows in fp16 (models/t5.py): an fp16 run keeps it in bf16 where the device has bf16, else fp32."""
    if isinstance(module, TextEncoder) or dtype != torch.float16:
        return dtype
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def build_texts(source: WeightSource, info: ModelInfo, dtype: torch.dtype, device: torch.device) -> tuple:
    """Every text encoder the family declares, each strictly from its own place in the file, in the family's
    order; None in the place of an optional encoder the file does not hold (SD3 without T5)."""
    out = []
    for part in _text_parts(source, info):
        module = load_part(*part, text_dtype(part[1], dtype, device), device)
        if isinstance(module, TextEncoder):
            module.reset_buffers()
        out.append(module)
    return _aligned(info, out)


def _aligned(info: ModelInfo, built: list) -> tuple:
    """The built encoders in the family's order, None where an optional one is absent."""
    texts = info.texts or (None,) * len(info.spec.text)
    modules = iter(built)
    return tuple(None if cfg is None else next(modules) for cfg in texts)


def _check_leftovers(source: WeightSource) -> None:
    other = sorted(k for k in source.entries if part_of(k) == "other" and not is_ignored(k))
    if other:
        raise BadInputError(f"{source.path}: unexpected tensors outside UNet/VAE/text encoder: {listing(other)}")


def _check_headers(source: WeightSource, info: ModelInfo, vae: str | Path | None) -> None:
    """What a strict load would refuse, from the header alone (names, shapes, stored dtypes): a part built later
    (residency lean/offload) fails no differently than one built now, except for NaN/Inf in its values."""
    try:
        texts = _text_parts(source, info)
    except ModelNotFoundError:  # said when a stage first needs the text encoders (encode/decode never do)
        texts = []
    for part in (_unet_part(source, info), *texts):
        check_part(*part)
    if vae is None:
        check_part(*vae_part(source, _vae_config(info, source.path)))
    else:
        check_vae_file(vae, info.spec)


def _vae_config(info: ModelInfo, path: Path) -> VAEConfig:
    """The checkpoint's VAE; a file without one needs --vae (exit 4)."""
    if info.vae is None:
        raise ModelNotFoundError(f"{path}: no VAE in this file ({VAE_PREFIX}*): give one with --vae FILE "
                                 "(FLUX.1: ae.safetensors)")
    return info.vae


def check_vae_file(path: str | Path, family: Family | None) -> bool:
    """A --vae file or folder checked from its header: True for a TAESD (its name must fit the family)."""
    from sdcli.loading import vae as vae_files

    path = Path(path)
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such VAE file or folder")
    tiny = vae_files.tiny_file(path)
    if tiny is not None:
        if family is not None:
            vae_files.check_taesd_fits(tiny, family)
        return True
    source = standalone_vae_source(path)
    try:
        check_part(*vae_part(source, infer_vae_config(shapes_of(source.header))))
    except BadInputError as e:  # as load_vae says it
        raise e if str(path) in str(e) else BadInputError(f"{path}: {e}") from None
    finally:
        source.close()
    return False


def _builders(opener, info: ModelInfo, vae: str | Path | None, dtype: torch.dtype, home: torch.device) -> dict:
    """part -> a function reading it from the files (the checkpoint opened anew each time by `opener`)."""

    def from_checkpoint(build):
        def read():
            source = opener()
            try:
                return build(source)
            finally:
                source.close()

        return read

    if vae is not None:
        def read_vae():
            return load_vae_file(vae, dtype, home, info.spec)
    else:
        read_vae = from_checkpoint(lambda s: build_vae(s, _vae_config(info, s.path), vae_dtype(info.spec, dtype),
                                                       home))  # fmt: skip
    return {"unet": from_checkpoint(lambda s: build_unet(s, info, dtype, home)),
            "text": from_checkpoint(lambda s: build_texts(s, info, dtype, home)),
            "vae": read_vae}


def _skeletons(info: ModelInfo) -> dict:
    """part -> its modules built on the meta device (no weights): LoRA names are matched against these."""

    def on_meta(make):
        def build():
            with torch.device("meta"):
                return make()

        return build

    places = info.text_places or (None,) * len(info.texts)
    return {"unet": on_meta(lambda: build_denoiser(info.spec.denoiser, info.unet)),
            "text": on_meta(lambda: tuple(None if cfg is None else _text_module(cfg, place[0])
                                          for cfg, place in zip(info.texts, places)))}


def _read_all(parts: Residency, source: WeightSource, info: ModelInfo, vae: str | Path | None) -> None:
    """Every part read now, from the source already open, in the order errors have always been found."""
    dtype, home = parts.dtype, parts.home
    parts.parts["unet"] = build_unet(source, info, dtype, home)
    parts.parts["text"] = build_texts(source, info, dtype, home)
    parts.parts["vae"] = load_vae_file(vae, dtype, home, info.spec) if vae is not None else \
        build_vae(source, _vae_config(info, source.path), vae_dtype(info.spec, dtype), home)  # fmt: skip
    parts.where.update({part: home for part in parts.parts})


def _open_model(path: Path, text_files: dict | None):
    """(a function opening the checkpoint with its separate text encoder files in place, its source now, the
    family the checkpoint alone shows): components.with_text_files."""
    source = open_source(path)
    try:
        family = detect_family(shapes_of(source.header))
    except (BadInputError, UnsupportedModelError) as e:  # detection sees only a header: name the file, and
        source.close()  # its format when the name suggests another
        kind = "a GGUF file: " if path.suffix.lower() != ".gguf" and is_gguf(path) else ""
        raise type(e)(f"{path}: {kind}{e}") from None
    files = {k: v for k, v in (text_files or {}).items() if v}
    components.check_flags(family, files)

    def opener():
        return components.with_text_files(open_source(path), family, files)

    try:
        merged = components.with_text_files(source, family, files)
    except BaseException:
        source.close()
        raise
    return opener, merged, family


def load_models(model: str | Path, vae: str | Path | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", prediction: str | None = None, placement: Any = None,
                residency: str = "keep", text_files: dict | None = None) -> Models:
    """Resolve, detect and check UNet, VAE and text encoder of one checkpoint strictly; `residency` (a policy of
    loading/residency.py) says which parts are read now: all of them under keep, the others when first used.
    `text_files`: config key ("clip_l", "clip_g", "t5") -> a text encoder's own file (loading/components.py)."""
    path = resolve_model(str(model), hub_patterns())
    device = torch.device(device)
    opener, source, family = _open_model(path, text_files)
    try:
        try:
            info = detect(source.header, prediction, family)
        except (BadInputError, UnsupportedModelError) as e:  # detection sees only a header: name the file
            raise type(e)(f"{path}: {e}") from None
        _check_leftovers(source)
        files = {f for e in source.entries.values() for f in e.files}
        files = stamps(files | ({Path(vae)} if vae is not None else set()))
        home = home_of(residency, device)
        parts = Residency(_builders(opener, info, vae, dtype, home), _skeletons(info), residency, device, dtype,
                          files)  # fmt: skip
        # A pickle has no tensor to read alone: reading a part again unpickles the whole file, which would cost
        # more memory than holding the parts; so it is read once, now (lean/offload may still let parts go).
        if residency == "keep" or source.layout == "ckpt":
            _read_all(parts, source, info, vae)
        else:
            _check_headers(source, info, vae)
    finally:
        source.close()
    if info.prediction_source == "guess":  # the family's default was a guess: its probe settles it
        unet = parts.stage("unet")
        info = dataclasses.replace(info, prediction=info.spec.settle_prediction(unet), prediction_source="probe")
    parts.loaded = True
    name = path.name if path.is_dir() else path.stem
    vae_path = Path(vae) if vae is not None else None
    tiny = vae is not None and vae_files.tiny_file(Path(vae)) is not None
    return Models(parts, info, path, name, vae_path, placement, vae_is_tiny=tiny)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def vae_dtype(family: Family, dtype: torch.dtype) -> torch.dtype:
    """The dtype the checkpoint's own VAE runs in: the run's, except in fp16 for a family whose VAE overflows
    there (SDXL's: diffusers' force_upcast); a --vae file (an fp16-fix) keeps the run's dtype. The NaN retry of
    pipeline.decode_latents stays the last guard."""
    if dtype == torch.float16 and family.vae_fp16_fallback is not None:
        return _DTYPES[family.vae_fp16_fallback]
    return dtype

"""Upscaler files: what a file is, from its tensor names and shapes, and loading it.

sdcli runs the most downloaded architectures itself (``sdcli.models.esrgan``):

- ESRGAN / RRDBNet in its three key layouts, all renamed to Real-ESRGAN's (BasicSR) names by the tables below:
  BasicSR (``conv_first``, ``body.N.rdb1.conv1``: Real-ESRGAN x4plus/x2plus/anime_6B), the original ESRGAN
  Sequential (``model.0``, ``model.1.sub.N.RDB1.conv1.0``: ESRGAN_4x, 4x-UltraSharp, most community models)
  and xinntao/ESRGAN's 2019 names (``RRDB_trunk``, ``trunk_conv``, ``upconv1``, ``HRconv``: BSRGAN, RealSR);
- Real-ESRGAN Compact (SRVGGNetCompact, ``body.N``: realesr-general-x4v3, realesr-animevideov3).

Any other architecture goes to spandrel (MIT, chaiNNer's loader, as A1111 and ComfyUI use) when it can be
imported: its main registry only, never ``spandrel_extra_arches`` (non-commercial licences), and given the
tensors sdcli read itself, so a pickle is only ever opened by sdcli's one restricted unpickler
(``formats/pickle_ckpt.load_pickle``). Without spandrel such a file is UnsupportedModelError (exit 8).
Files that are something else (an SD checkpoint, a LoRA, a face-restoration or inpainting model, a truncated
file) are BadInputError (exit 3), one line naming what the file seems to be.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdcli.runtime.errors import BadInputError, ModelNotFoundError, UnsupportedModelError
from sdcli.formats.ldm import refuse_empty
from sdcli.formats.pickle_ckpt import PICKLE_SUFFIXES, is_pickle, load_pickle
from sdcli.formats.safetensors import dtype_name, read_header
from sdcli.formats.source import Entry, WeightSource
from sdcli.formats.strict import load_part
from sdcli.models import esrgan

# Where training code nests the weights inside a pickle, and prefixes it leaves on every name (DataParallel,
# BasicSR's generator): spandrel's canonicalize_state_dict, same order.
WRAPPER_KEYS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")
COMMON_PREFIXES = ("module.", "netG.")

# xinntao/ESRGAN's 2019 RRDBNet names (BSRGAN, RealSR) -> BasicSR names: (stored pattern, our name).
ESRGAN_2019_RENAMES = (
    (r"^RRDB_trunk\.(\d+)\.RDB(\d)\.", r"body.\1.rdb\2."),
    (r"^trunk_conv\.", "conv_body."),
    (r"^upconv(\d+)\.", r"conv_up\1."),
    (r"^HRconv\.", "conv_hr."),
)


def old_esrgan_renames(num_blocks: int, num_upsamples: int) -> tuple[tuple[str, str], ...]:
    """The original ESRGAN Sequential -> BasicSR names. ``model.1`` is the shortcut around the RRDB trunk (its
    last entry, index num_blocks, is conv_body); then each x2 step is Upsample, conv, LeakyReLU (the conv at
    3, 6, ...), then conv_hr, LeakyReLU, conv_last. Convs followed by an activation carry a ``.0``."""
    n = num_upsamples
    return (
        (r"^model\.0\.", "conv_first."),
        (r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.", r"body.\1.rdb\2.conv\3."),
        (rf"^model\.1\.sub\.{num_blocks}\.", "conv_body."),
        *((rf"^model\.{3 * i}\.", f"conv_up{i}.") for i in range(1, n + 1)),
        (rf"^model\.{3 * n + 2}\.", "conv_hr."),
        (rf"^model\.{3 * n + 4}\.", "conv_last."),
    )  # fmt: skip


def _prefixed(keys: set[str], *prefixes: str) -> bool:
    return any(k.startswith(prefixes) for k in keys)


# Files that are not upscalers, checked first: (test on the key set, what the file seems to be).
NOT_UPSCALERS = (
    (lambda ks: _prefixed(ks, "model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner."),
     "a Stable Diffusion checkpoint"),
    (lambda ks: any(re.search(r"lora_(down|up)|\.lora_[AB]\.|^lora_", k) for k in ks), "a LoRA"),
    (lambda ks: _prefixed(ks, "control_model.", "input_hint_block.", "controlnet_cond_embedding."), "a ControlNet"),
    (lambda ks: _prefixed(ks, "stylegan_decoder."), "GFPGAN, a face-restoration model"),
    (lambda ks: "quantize.embedding.weight" in ks and _prefixed(ks, "position_emb", "ft_layers.", "idx_pred_layer."),
     "CodeFormer, a face-restoration model"),
    (lambda ks: {"quantize.embedding.weight", "encoder.conv_in.weight"} <= ks,
     "RestoreFormer, a face-restoration model"),
    (lambda ks: _prefixed(ks, "model.model.1.bn_l.", "generator.model.1.bn_l."), "LaMa, an inpainting model"),
    (lambda ks: {"encoder.conv_in.weight", "decoder.conv_out.weight"} <= ks, "a VAE (an autoencoder)"),
    (lambda ks: bool(ks) and ks <= {"emb_params", "clip_l", "clip_g"}, "a textual-inversion embedding"),
)  # fmt: skip

# Upscalers spandrel runs and sdcli does not, named in the exit-8 message (spandrel's detect conditions).
SPANDREL_NAMES = (
    (lambda ks: _prefixed(ks, "model.1.sub.0.RDB1.conv1x1."), "ESRGAN+"),
    (lambda ks: "relative_position_index_SA" in ks, "HAT/ATD"),
    (lambda ks: "patch_embed.proj.weight" in ks and _prefixed(ks, "layers.0.residual_group."), "Swin2SR"),
    (lambda ks: _prefixed(ks, "layers.0.residual_group.blocks.0."), "SwinIR"),
    (lambda ks: "before_RG.1.weight" in ks, "DAT"),
    (lambda ks: "block_1.c1_r.sk.weight" in ks, "SPAN"),
    (lambda ks: _prefixed(ks, "unet1.conv1.conv.0."), "Real-CUGAN"),
    (lambda ks: {"m_head.0.weight", "m_tail.0.weight"} <= ks, "SCUNet"),
    (lambda ks: _prefixed(ks, "residual_layer.0.residual_layer.0."), "OmniSR"),
)  # fmt: skip


# --- reading a file ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredFile:
    """A file's tensors under canonical names (wrappers and common prefixes removed)."""

    path: Path
    format: str  # "safetensors" | "pickle"
    entries: dict[str, Entry]  # canonical name -> where it is stored (Entry.key is the real stored name)
    tensors: dict[str, Tensor] | None = None  # a pickle's tensors, already in memory, by canonical name

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: e.shape for k, e in self.entries.items()}


def _strip_prefixes(names: list[str]) -> dict[str, str]:
    """canonical name -> stored name, after removing a prefix every name shares."""
    mapping = {n: n for n in names}
    for prefix in COMMON_PREFIXES:
        if mapping and all(k.startswith(prefix) for k in mapping):
            mapping = {k[len(prefix):]: v for k, v in mapping.items()}
    return mapping


def _unwrap(path: Path, obj: Any) -> dict[str, Tensor]:
    """The tensors of an unpickled object: the state dict inside a known wrapper key or a single-key dict."""
    if not isinstance(obj, dict):
        raise BadInputError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict of tensors")
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not tensors:
        raise BadInputError(f"{path}: the pickle holds no tensors (not a model file)")
    return tensors


def read_stored(path: str | Path) -> StoredFile:
    """Names, shapes and dtypes of a .safetensors file (its header only) or a pickle (.pth/.pt/.ckpt/.bin, read
    whole by the restricted unpickler). Only a pickle suffix opts in to unpickling: a pickle renamed to
    anything else is refused by read_header's sniffing."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES and is_pickle(path):
        raw = _unwrap(path, load_pickle(path, "upscaler"))
        names = _strip_prefixes(list(raw))
        tensors = {k: raw[v] for k, v in names.items()}
        entries = {k: Entry(path, k, dtype_name(t), tuple(t.shape)) for k, t in tensors.items()}
        return StoredFile(path, "pickle", entries, tensors)
    header = read_header(path)  # one line for empty, truncated, HTML, LFS-pointer and renamed-pickle files
    names = _strip_prefixes([k for k in header if k != "__metadata__"])
    entries = {k: Entry(path, v, header[v]["dtype"], tuple(header[v]["shape"])) for k, v in names.items()}
    if not entries:
        raise BadInputError(f"{path}: the file holds no tensors")
    return StoredFile(path, "safetensors", entries)


# --- what it is -------------------------------------------------------------------------------------------


def classify(keys: set[str]) -> str:
    """The layout of an upscaler's tensor names: "basicsr", "esrgan-2019", "esrgan-old" (RRDBNet), "compact",
    or "other" (for spandrel). Raises BadInputError for files that are known to be something else."""
    for test, what in NOT_UPSCALERS:
        if test(keys):
            raise BadInputError(f"not an upscaler: this is {what}")
    if _prefixed(keys, "model.1.sub.0.RDB1.conv1x1.", "body.0.rdb1.conv1x1."):
        return "other"  # ESRGAN+: spandrel's
    if {"conv_first.weight", "body.0.rdb1.conv1.weight"} <= keys:
        return "basicsr"
    if {"conv_first.weight", "RRDB_trunk.0.RDB1.conv1.weight"} <= keys:
        return "esrgan-2019"
    if {"model.0.weight", "model.1.sub.0.RDB1.conv1.0.weight"} <= keys:
        return "esrgan-old"
    if {"body.0.weight", "body.1.weight"} <= keys and all(re.match(r"body\.\d+\.(weight|bias)$", k) for k in keys):
        return "compact"
    return "other"


def _rename(name: str, rules) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name  # left as stored: the strict load lists it as unexpected


def _old_counts(keys: set[str]) -> tuple[int, int]:
    """(RRDB blocks, x2 upsamplings) of an original-layout ESRGAN, from the indices of its Sequential."""
    blocks = max(int(m.group(1)) for k in keys if (m := re.match(r"model\.1\.sub\.(\d+)\.RDB", k))) + 1
    last = max(int(m.group(1)) for k in keys if (m := re.match(r"model\.(\d+)\.weight$", k)))
    if last < 4 or (last - 4) % 3:
        raise BadInputError(f"unusual ESRGAN layout: its last layer is model.{last} (expected model.4, .7, .10, ...)")
    return blocks, (last - 4) // 3


def renamed(stored: StoredFile, layout: str) -> dict[str, Entry]:
    """The file's entries under our (BasicSR) names."""
    keys = set(stored.entries)
    if layout == "esrgan-old":
        rules = old_esrgan_renames(*_old_counts(keys))
    else:
        rules = ESRGAN_2019_RENAMES if layout == "esrgan-2019" else ()
    return {_rename(k, rules): e for k, e in stored.entries.items()}


# --- description and loading ------------------------------------------------------------------------------

ARCHITECTURES = {"basicsr": "ESRGAN", "esrgan-2019": "ESRGAN", "esrgan-old": "ESRGAN", "compact": "RealESRGAN Compact"}
LAYOUT_NAMES = {"basicsr": "Real-ESRGAN/BasicSR names", "esrgan-2019": "ESRGAN 2019 names (BSRGAN, RealSR)",
                "esrgan-old": "original ESRGAN names (model.N)", "compact": "Real-ESRGAN Compact names",
                "spandrel": "read by spandrel"}  # fmt: skip


@dataclass(frozen=True)
class UpscalerInfo:
    path: Path
    architecture: str  # "ESRGAN", "RealESRGAN Compact", or spandrel's architecture name
    layout: str  # a key of LAYOUT_NAMES
    scale: int
    in_channels: int  # image channels the model takes (after any pixel-unshuffle is undone)
    out_channels: int
    parameters: int
    config: esrgan.RRDBConfig | esrgan.CompactConfig | None = None  # None: a spandrel model
    tags: tuple[str, ...] = ()  # spandrel's tags ("64nf", "23nb", ...)
    dtypes: dict = field(default_factory=dict)  # stored dtype -> tensor count
    format: str = "safetensors"

    @property
    def purpose(self) -> str:
        return "SR" if self.scale > 1 else "Restoration"  # spandrel's words: a 1x model restores


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _native(stored: StoredFile, layout: str) -> tuple[UpscalerInfo, dict[str, Entry]]:
    """(what it is, its entries under our names) for an architecture sdcli runs, from names and shapes only."""
    try:
        entries = renamed(stored, layout)
        shapes = {k: e.shape for k, e in entries.items()}
        cfg = esrgan.compact_config(shapes) if layout == "compact" else esrgan.rrdb_config(shapes)
    except BadInputError as e:
        raise BadInputError(f"{stored.path}: {e}") from None
    info = UpscalerInfo(stored.path, ARCHITECTURES[layout], layout, cfg.scale, cfg.image_channels,
                        cfg.out_channels, sum(_numel(s) for s in shapes.values()), cfg,
                        dtypes=dict(Counter(e.dtype for e in entries.values())), format=stored.format)  # fmt: skip
    return info, entries


class Upscaler:
    """A loaded upscaler: ``upscaler(x)`` maps (1, C, H, W) in [0, 1] to (1, C', sH, sW) in [0, 1] (clamped,
    as spandrel's ImageModelDescriptor does). ``net`` is our module or a spandrel descriptor."""

    def __init__(self, info: UpscalerInfo, net: Any, dtype: torch.dtype, device: torch.device):
        self.info, self.net, self.dtype, self.device = info, net, dtype, device

    @property
    def scale(self) -> int:
        return self.info.scale

    @property
    def input_channels(self) -> int:
        return self.info.in_channels

    @property
    def output_channels(self) -> int:
        return self.info.out_channels

    def __call__(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.net(x.to(self.device, self.dtype)).clamp(0, 1)


def _spandrel():
    """The spandrel package, or UnsupportedModelError saying why it cannot be used."""
    from sdcli.runtime.extras import install_hint

    try:
        import spandrel
    except Exception as e:  # ImportError, or the RuntimeError of a torchvision built for another torch
        why = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UnsupportedModelError(f"runs only through spandrel, which cannot be imported ({why}): "
                                    f"{install_hint('spandrel')}; it needs a torchvision matching this torch") from None
    return spandrel


def _read_tensors(stored: StoredFile) -> dict[str, Tensor]:
    if stored.tensors is not None:
        return stored.tensors
    from safetensors import safe_open

    with safe_open(str(stored.path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(e.key) for k, e in stored.entries.items()}


def _spandrel_load(stored: StoredFile, keys: set[str]):
    """spandrel's ImageModelDescriptor for a file sdcli does not run itself (main registry only)."""
    guess = next((name for test, name in SPANDREL_NAMES if test(keys)), None)
    try:
        spandrel = _spandrel()
    except UnsupportedModelError as e:
        what = f"a {guess} model" if guess else "this upscaler"
        raise UnsupportedModelError(f"{stored.path}: {what} {e}") from None
    try:
        desc = spandrel.ModelLoader(registry=spandrel.MAIN_REGISTRY).load_from_state_dict(_read_tensors(stored))
    except spandrel.UnsupportedModelError:
        raise BadInputError(f"{stored.path}: not an upscaler: no architecture of sdcli or spandrel matches its "
                            f"tensors ({', '.join(sorted(keys)[:3])}, ...)") from None  # fmt: skip
    except Exception as e:  # an architecture matched, but the tensors do not fit it
        raise BadInputError(f"{stored.path}: spandrel could not load it ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None  # fmt: skip
    if not isinstance(desc, spandrel.ImageModelDescriptor) or desc.purpose not in ("SR", "Restoration"):
        raise BadInputError(f"{stored.path}: not an upscaler: a {desc.architecture.name} model for {desc.purpose}")
    return desc


def _spandrel_info(stored: StoredFile, desc) -> UpscalerInfo:
    params = sum(p.numel() for p in desc.model.parameters())
    dtypes = dict(Counter(e.dtype for e in stored.entries.values()))
    return UpscalerInfo(stored.path, desc.architecture.name, "spandrel", desc.scale, desc.input_channels,
                        desc.output_channels, params, tags=tuple(desc.tags), dtypes=dtypes, format=stored.format)


def _identify(path: str | Path) -> tuple[StoredFile, str]:
    stored = read_stored(path)
    try:
        layout = classify(set(stored.entries))
    except BadInputError as e:
        raise BadInputError(f"{stored.path}: {e}") from None
    refuse_empty(stored.shapes, stored.entries, stored.path)  # a width of 0 read from a shape builds no network
    return stored, layout


def inspect_upscaler(path: str | Path) -> UpscalerInfo:
    """What the upscaler at `path` is. Header only for our architectures in .safetensors; a spandrel model is
    built (on the CPU) to learn its scale and channels."""
    stored, layout = _identify(path)
    if layout == "other":
        return _spandrel_info(stored, _spandrel_load(stored, set(stored.entries)))
    return _native(stored, layout)[0]


def describe(path: str | Path, info: UpscalerInfo | None = None) -> dict:
    """Fields for `sdcli inspect` on an upscaler file (`info`: inspect_upscaler's, when it was read already)."""
    info = inspect_upscaler(path) if info is None else info
    cfg = info.config
    return {
        "kind": "upscaler", "architecture": info.architecture, "layout": LAYOUT_NAMES[info.layout],
        "scale": info.scale, "in_channels": info.in_channels, "out_channels": info.out_channels,
        "blocks": cfg.num_blocks if isinstance(cfg, esrgan.RRDBConfig) else getattr(cfg, "num_convs", None),
        "features": getattr(cfg, "num_features", None),
        "unshuffle": cfg.unshuffle if isinstance(cfg, esrgan.RRDBConfig) else None,
        "parameters": info.parameters, "purpose": info.purpose, "tags": list(info.tags),
        "dtypes": dict(info.dtypes), "format": info.format,
    }  # fmt: skip


def load_upscaler(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Upscaler:
    """Detect and load an upscaler: ours strictly (every tensor placed, shapes and finiteness checked), any
    other architecture through spandrel (kept in fp32 where spandrel says it does not support `dtype`)."""
    stored, layout = _identify(path)
    device = torch.device(device)
    if layout == "other":
        desc = _spandrel_load(stored, set(stored.entries))
        ok = {torch.float16: desc.supports_half, torch.bfloat16: desc.supports_bfloat16}.get(dtype, True)
        dtype = dtype if ok else torch.float32
        desc.to(device, dtype).eval()
        return Upscaler(_spandrel_info(stored, desc), desc, dtype, device)
    info, entries = _native(stored, layout)
    net = _build(info)
    source = WeightSource(stored.path, entries, layout="single", tensors=stored.tensors)
    try:
        plan = {k: (k, None) for k in entries}
        load_part(info.architecture, net, source, plan, [], dtype, device)
    finally:
        source.close()
    return Upscaler(info, net, dtype, device)


def _build(info: UpscalerInfo) -> nn.Module:
    with torch.device("meta"):  # no random init: load_part assigns the file's tensors
        if isinstance(info.config, esrgan.CompactConfig):
            return esrgan.SRVGGNetCompact(info.config)
        return esrgan.RRDBNet(info.config)

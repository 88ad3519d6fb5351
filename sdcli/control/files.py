"""ControlNet files: what a file is (from its tensor names and shapes alone), its config, strict loading, and
the check that it fits the base model.

Layouts read (every one ends up under the module names of ``sdcli.models.controlnet``, i.e. cldm's):

- original (lllyasviel ControlNet 1.0/1.1): ``control_model.*``; ControlNet 1.0 ``.pth`` files also carry a
  whole SD model (``model.diffusion_model.*``...), which is skipped;
- original without prefix (thibaud's SD2.1 files, ``time_embed.0.weight``...);
- diffusers (``controlnet_cond_embedding``, ``down_blocks``, ``controlnet_down_blocks``...), one file or a
  folder with ``config.json``; renamed by the UNet table of ``loading/checkpoint.py`` plus ``CONTROLNET_RENAMES``.

``.safetensors`` files and, through the restricted unpickler, ``.pth``/``.ckpt``/``.pt``/``.bin`` files.
Refused with exit 8, named: Control-LoRA, difference ControlNets, T2I-Adapters, ControlNet-Union,
ControlNet-LLLite, SD3/Flux ControlNets. Refused with exit 3: anything else that is not a ControlNet.
Upstream detection: ComfyUI ``comfy/controlnet.py::load_controlnet_state_dict``; diffusers
``single_file_utils.py::convert_controlnet_checkpoint``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdcli.formats.diffusers import component_files, count, read_json_object, rename, unet_prefix_pairs
from sdcli.formats.ldm import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, refuse_empty
from sdcli.formats.pickle_ckpt import PICKLE_SUFFIXES, is_pickle, load_ckpt
from sdcli.formats.safetensors import dtype_name, read_header
from sdcli.formats.source import Entry, WeightSource
from sdcli.formats.strict import is_ignored, load_part
from sdcli.runtime.errors import BadInputError, ModelNotFoundError, UnsupportedModelError
from sdcli.models.controlnet import ControlNet, ControlNetConfig
from sdcli.models.unet import UNetConfig, _depth

ORIGINAL_PREFIX = "control_model."
SD_PARTS = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)  # a whole SD model inside ControlNet 1.0 .pth files
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")

# diffusers name -> original name of the modules a ControlNet has beyond the UNet encoder (the encoder itself
# goes by loading/checkpoint.py's UNet table). Upstream: diffusers convert_controlnet_checkpoint, read backwards.
CONTROLNET_RENAMES = (
    ("controlnet_cond_embedding.conv_in", "input_hint_block.0"),
    *((f"controlnet_cond_embedding.blocks.{i}", f"input_hint_block.{2 * i + 2}") for i in range(6)),
    ("controlnet_cond_embedding.conv_out", "input_hint_block.14"),
    ("controlnet_mid_block", "middle_block_out.0"),
    ("add_embedding.linear_1", "label_emb.0.0"),  # SDXL (diffusers' own converter forgets these four)
    ("add_embedding.linear_2", "label_emb.0.2"),
)  # fmt: skip

# Files that look like ControlNets but are something else: (test on the key set, what to call them).
OTHER_KINDS = (
    (lambda ks: any(k.startswith("lora_controlnet") for k in ks), "a Control-LoRA (Stability AI's LoRA-compressed ControlNet)"),
    (lambda ks: any(k.endswith((".up", ".down")) for k in ks), "a Control-LoRA (LoRA up/down pairs)"),
    (lambda ks: "difference" in ks, "a difference ControlNet (weights relative to a base model)"),
    (lambda ks: any(k.startswith(("adapter.", "body.")) for k in ks), "a T2I-Adapter, not a ControlNet"),
    (lambda ks: any(re.search(r"(^|\.)(task_embedding|control_add_embedding|controlnet_mode_embedder)", k)
                    for k in ks), "a ControlNet-Union (ProMax) model"),  # fmt: skip
    (lambda ks: any(k.startswith("lllite_") for k in ks), "a ControlNet-LLLite model"),
    (lambda ks: any(k.startswith(("controlnet_blocks.", "controlnet_x_embedder", "pos_embed_input"))
                    for k in ks), "a ControlNet for a transformer model (SD3 / Flux)"),  # fmt: skip
)  # fmt: skip


@dataclass(frozen=True)
class ControlNetInfo:
    path: Path
    layout: str  # "original" | "original-bare" | "diffusers" (file) | "diffusers-folder"
    config: ControlNetConfig
    family: str  # what it is for, as a user reads it: "SD1.5", "SD2.x", "SDXL", ...
    bgr: bool = False  # diffusers config: controlnet_conditioning_channel_order == "bgr" (flip the hint)
    params: int = 0
    dtypes: dict = field(default_factory=dict)  # stored dtype -> tensor count
    skipped: int = 0  # tensors of a bundled SD model (ControlNet 1.0 .pth) left out


def family_name(cfg: UNetConfig) -> str:
    """The model family a UNet (or a ControlNet's encoder) belongs to, from its context and vector widths."""
    if cfg.adm_in_channels is not None:
        return {2816: "SDXL", 2560: "SDXL refiner"}.get(cfg.adm_in_channels, f"SDXL-like (vector {cfg.adm_in_channels})")
    return {768: "SD1.5", 1024: "SD2.x"}.get(cfg.context_dim, f"context width {cfg.context_dim}")


# --- what a file is ---------------------------------------------------------------------------------------

def classify(keys: list[str]) -> tuple[str, str]:
    """(layout, prefix) of a ControlNet's tensor names; raises for everything that is not a ControlNet."""
    names = set(keys)
    for test, what in OTHER_KINDS:  # first: a difference ControlNet has control_model.* names too
        if test(names):
            raise UnsupportedModelError(f"this is {what}: not supported")
    if f"{ORIGINAL_PREFIX}input_hint_block.0.weight" in names:
        return "original", ORIGINAL_PREFIX
    if "input_hint_block.0.weight" in names:
        return "original-bare", ""
    if "controlnet_cond_embedding.conv_in.weight" in names:
        return "diffusers", ""
    if any(k.startswith(SD_PARTS) for k in names):
        raise BadInputError("this is a Stable Diffusion checkpoint, not a ControlNet (no input_hint_block)")
    raise BadInputError("not a ControlNet: no input_hint_block / controlnet_cond_embedding tensors")


def controlnet_prefix_pairs(levels: int, res: int, attn: tuple[bool, ...]) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) for every module of a ControlNet of that encoder shape."""
    decoder = ("up_blocks.", "conv_norm_out", "conv_out")  # the UNet's, not the ControlNet's
    pairs = [p for p in unet_prefix_pairs(levels, res, attn) if not p[0].startswith(decoder)]
    pairs += CONTROLNET_RENAMES
    skips = 1 + levels * res + levels - 1
    return pairs + [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(skips)]


def diffusers_table(keys: list[str]) -> dict[str, str]:
    """diffusers name prefix -> original name prefix for the tensors of a diffusers ControlNet."""
    levels = count(keys, r"down_blocks\.(\d+)\.")
    res = count(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    attn = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(levels))
    return dict(controlnet_prefix_pairs(levels, res, attn))


def _open_entries(path: Path) -> tuple[dict[str, Entry], dict[str, torch.Tensor] | None, dict]:
    """Raw entries of a single file (names as stored), the tensors when it is a pickle, and its metadata."""
    if not path.exists():
        raise ModelNotFoundError(f"{path}: no such file")
    if path.suffix.lower() in PICKLE_SUFFIXES and is_pickle(path):
        state = load_ckpt(path)  # torch's weights_only unpickler: no code of the file runs
        return {k: Entry(path, k, dtype_name(t), tuple(t.shape)) for k, t in state.items()}, state, {}
    header = read_header(path)
    entries = {k: Entry(path, k, v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    return entries, None, header.get("__metadata__") or {}


def _folder_entries(folder: Path) -> tuple[dict[str, Entry], dict]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise BadInputError(f"{folder}: a folder, but not a diffusers ControlNet (no config.json)")
    config = read_json_object(config_file, "ControlNet config")  # size and nesting bounded, an object
    entries = {}
    for f in component_files(folder, FOLDER_WEIGHTS):
        header = read_header(f)
        entries.update({k: Entry(f, k, v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"})
    return entries, config


def open_controlnet(path: str | Path) -> tuple[WeightSource, str, dict, int]:
    """(source under original names without prefix, layout, diffusers config or {}, skipped tensor count)."""
    path = Path(path)
    tensors, config = None, {}
    if path.is_dir():
        raw, config = _folder_entries(path)
    else:
        raw, tensors, _ = _open_entries(path)
    layout, prefix = classify(list(raw))
    if path.is_dir():
        layout = "diffusers-folder"
    table = diffusers_table(list(raw)) if layout.startswith("diffusers") else None
    entries, skipped = {}, 0
    for key, e in raw.items():
        if prefix and not key.startswith(prefix):
            if key.startswith(SD_PARTS) or is_ignored(key):
                skipped += 1
                continue
            name = f"unmapped.{key}"  # reported as unexpected by the strict load
        elif table is not None:
            name = rename(key, table) or f"unmapped.{key}"
        else:
            name = key[len(prefix):]
        entries[name] = e
    return WeightSource(path, entries, layout=layout, tensors=tensors), layout, config, skipped


# --- hyperparameters from shapes --------------------------------------------------------------------------

def _need(shapes: dict, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise BadInputError(f"cannot read the ControlNet: tensor {key!r} is missing")
    return tuple(shapes[key])


def _encoder_config(shapes: dict, base: UNetConfig | None) -> UNetConfig:
    """The UNet encoder's hyperparameters (the decoder-only fields stay at their defaults)."""
    keys = list(shapes)
    conv_in = _need(shapes, "input_blocks.0.0.weight")
    mc = conv_in[0]
    downs = sorted(int(m.group(1)) for k in keys if (m := re.match(r"input_blocks\.(\d+)\.0\.op\.weight$", k)))
    res = downs[0] - 1 if downs else count(keys, r"input_blocks\.(\d+)\.") - 1
    levels = len(downs) + 1
    first = [1 + i * (res + 1) for i in range(levels)]
    mult = tuple(_need(shapes, f"input_blocks.{n}.0.out_layers.3.weight")[0] // mc for n in first)
    depths = []
    for level, n in enumerate(first):
        found = {_depth(shapes, f"input_blocks.{n + i}.1.") for i in range(res)}
        if len(found) != 1:
            raise BadInputError(f"ControlNet level {level} has transformers of different depths {sorted(found)}")
        depths.append(found.pop())
    mid = "middle_block.1."
    mid_depth = _depth(shapes, mid)
    attn_depths = {d for d in depths if d} | {mid_depth}
    uniform = len(attn_depths) == 1
    context = _need(shapes, mid + "transformer_blocks.0.attn2.to_k.weight")[1]
    adm = shapes.get("label_emb.0.0.weight")
    if base is not None:
        heads = dict(num_heads=base.num_heads, head_dim=base.head_dim)  # invisible in shapes: the base's split
    else:
        heads = dict(num_heads=8, head_dim=None) if context == 768 and adm is None else dict(num_heads=None, head_dim=64)
    cfg = UNetConfig(
        in_channels=conv_in[1], model_channels=mc, channel_mult=mult, num_res_blocks=res,
        attention_levels=tuple(d > 0 for d in depths),
        transformer_depth=attn_depths.pop() if uniform else tuple(depths),
        middle_depth=None if uniform else mid_depth, context_dim=context,
        use_linear_in_transformer=len(_need(shapes, mid + "proj_in.weight")) == 2,
        adm_in_channels=None if adm is None else adm[1], **heads,
    )  # fmt: skip
    for m, a in zip((*mult, mult[-1]), (*cfg.attention_levels, True)):
        n, width = cfg.heads_for(m * mc)
        if a and (n * width != m * mc or n == 0):
            raise BadInputError(f"ControlNet transformer width {m * mc} does not split into heads of {width}")
    return cfg


def infer_controlnet_config(shapes: dict, base: UNetConfig | None = None, global_pool: bool = False) -> ControlNetConfig:
    """A ControlNet's config from its tensor shapes under original names. The attention head split is not in
    the shapes: it is the base model's when given, else SD1's 8 heads for context 768, 64-wide heads otherwise."""
    first = _need(shapes, "input_hint_block.0.weight")
    widths = tuple(_need(shapes, f"input_hint_block.{i}.weight")[0] for i in (0, 4, 8, 12))
    if "input_hint_block.14.weight" not in shapes or "input_hint_block.16.weight" in shapes:
        raise BadInputError("the ControlNet's hint block is not the usual 8 convolutions (x8 downsampling)")
    if first[1] != 3:  # every hint sdcli makes is an RGB image; another width would only fail while sampling
        raise UnsupportedModelError(f"the ControlNet's hint block takes {first[1]} channels: sdcli feeds it RGB "
                                    "hints (3 channels)")
    return ControlNetConfig(unet=_encoder_config(shapes, base), hint_channels=first[1], hint_widths=widths,
                            global_pool=global_pool)  # fmt: skip


def detect_controlnet(path: str | Path, base: UNetConfig | None = None) -> tuple[ControlNetInfo, WeightSource]:
    """What the ControlNet at `path` is, from names and shapes only (no tensor data read, except in a pickle)."""
    path = Path(path)
    source, layout, config, skipped = open_controlnet(path)
    shapes = {k: e.shape for k, e in source.entries.items()}
    # shuffle: diffusers says so in config.json; single files only by name (ComfyUI's rule: "*shuffle")
    pool = bool(config.get("global_pool_conditions", path.stem.lower().endswith("shuffle")))
    try:
        refuse_empty(shapes, shapes)
        cfg = infer_controlnet_config(shapes, base, pool)
    except (BadInputError, UnsupportedModelError) as e:  # read from shapes alone: say which file
        source.close()
        raise e if path.name in str(e) else type(e)(f"{path}: {e}") from None
    dtypes = Counter(e.dtype for e in source.entries.values())
    params = sum(_numel(e.shape) for e in source.entries.values())
    info = ControlNetInfo(path, layout, cfg, family_name(cfg.unet),
                          bgr=config.get("controlnet_conditioning_channel_order") == "bgr",
                          params=params, dtypes=dict(dtypes), skipped=skipped)  # fmt: skip
    return info, source


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# --- fit to the base model, loading -----------------------------------------------------------------------

def check_fits(info: ControlNetInfo, base: UNetConfig, base_family: str | None = None) -> None:
    """Exit 3 unless the ControlNet's residuals fit the base UNet: same family (context and vector widths),
    latent channels, and the same encoder channels (so every residual meets a skip connection of its shape)."""
    cn = info.config.unet
    model = base_family or family_name(base)
    if (cn.context_dim, cn.adm_in_channels) != (base.context_dim, base.adm_in_channels):
        raise BadInputError(f"{info.path.name}: {_a(info.family)} ControlNet with {_a(model)} model "
                            f"(context width {cn.context_dim} vs {base.context_dim})")  # fmt: skip
    if cn.in_channels != base.out_channels:
        raise BadInputError(f"{info.path.name}: the ControlNet takes {cn.in_channels} latent channels, "
                            f"the model makes {base.out_channels}")  # fmt: skip
    ours = (cn.model_channels, cn.channel_mult, cn.num_res_blocks)
    theirs = (base.model_channels, base.channel_mult, base.num_res_blocks)
    if ours != theirs:
        raise BadInputError(f"{info.path.name}: the ControlNet's encoder (channels {_widths(cn)}, "
                            f"{cn.num_res_blocks} blocks per level) does not match the {model} model's "
                            f"({_widths(base)}, {base.num_res_blocks})")  # fmt: skip


def _a(name: str) -> str:
    return f"{'an' if name.startswith('S') else 'a'} {name}"  # "an SDXL", "an SD1.5": said ess-...


def _widths(cfg: UNetConfig) -> str:
    return "/".join(str(cfg.model_channels * m) for m in cfg.channel_mult)


def load_controlnet(path: str | Path, base: UNetConfig | None = None, base_family: str | None = None,
                    dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> tuple[ControlNet, ControlNetInfo]:  # fmt: skip
    """Detect, check against `base` (when given) before reading any weight, build on meta and load strictly."""
    info, source = detect_controlnet(path, base)
    try:
        if base is not None:
            check_fits(info, base, base_family)
        with torch.device("meta"):
            module = ControlNet(info.config)
        plan = {k: (k, None) for k in source.entries}
        return load_part("ControlNet", module, source, plan, [], dtype, torch.device(device)), info
    finally:
        source.close()


def describe(info: ControlNetInfo) -> list[str]:
    """Lines for `sdcli inspect` on a ControlNet file."""
    u, c = info.config.unet, info.config
    dtypes = ", ".join(f"{n} {k}" for k, n in sorted(info.dtypes.items()))
    lines = [
        f"ControlNet for {info.family} ({info.layout} layout), {info.params / 1e6:.1f}M parameters ({dtypes})",
        f"encoder: channels {_widths(u)}, {u.num_res_blocks} blocks per level, attention "
        f"{''.join('T' if a else '-' for a in u.attention_levels)}, transformer depth {u.transformer_depth}"
        + (f" (middle {u.middle_depth})" if u.middle_depth is not None else "")
        + f", context width {u.context_dim}" + (f", vector y {u.adm_in_channels}" if u.adm_in_channels else ""),
        f"hint: {c.hint_channels} channels in [0, 1]{' (BGR order)' if info.bgr else ''}, widths "
        f"{'/'.join(map(str, c.hint_widths))}, x8 down to the latent; "
        f"{skip_count(u)} down residuals + 1 middle" + (", globally pooled (shuffle)" if c.global_pool else ""),
    ]  # fmt: skip
    if info.skipped:
        lines.append(f"skipped: {info.skipped} tensors of a bundled Stable Diffusion model")
    return lines


def skip_count(u: UNetConfig) -> int:
    """UNet skip connections (= ControlNet down residuals): conv_in, each level's blocks, all but one downsample."""
    n = len(u.channel_mult)
    return 1 + n * u.num_res_blocks + (n - 1)

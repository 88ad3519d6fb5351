"""LoRA files merged into the loaded weights before sampling (SD 1.x/2.x/SDXL in the kohya / A1111 format; SD3/SD3.5 and
FLUX.1 in the kohya, diffusers/PEFT, AI-toolkit and XLabs formats: loading/lora_keys.py): from --lora, or
from a prompt's ``<lora:NAME:WEIGHT>`` tag (NAME looked up under lora_dir). Each set of LoRAs is merged once;
jobs that switch sets get the loaded weights back first (kept only when a run needs them). A part the residency reads
again (loading/residency.py: lean, offload) gets the set merged again, to the same bytes.

A kohya file holds, per adapted module, ``<name>.lora_down.weight`` (rank, in[, kh, kw]), ``<name>.lora_up.weight``
(out, rank[, 1, 1]) and an optional scalar ``<name>.alpha``; the merged weight is
``W + weight * alpha / rank * (up @ down)``. ``<name>`` is ``lora_unet_`` or ``lora_te_`` followed by the module
path with '.' -> '_'. kohya trains SD1 on the DIFFUSERS UNet, so its UNet names are diffusers paths
(``lora_unet_down_blocks_0_attentions_0_proj_in``); they are mapped onto our LDM module names through the same
rename table the diffusers-folder loader uses (``formats.diffusers.unet_prefix_pairs``). LDM-style names
(``lora_unet_input_blocks_1_1_proj_in``) are accepted too.
A diffusers/PEFT file names ``lora_A`` / ``lora_B`` (down / up) and keeps its alpha in the safetensors metadata (or
none: alpha = rank). Its to_q, to_k, to_v of a fused weight update their row blocks of it (lora_keys.Slot.rows).
Upstream: kohya-ss sd-scripts networks/lora.py (LoRAModule, LORA_PREFIX_*), A1111
extensions-builtin/Lora/networks.py and network_lora.py (key conversion, calc_updown).

A layer holding GGML blocks (a GGUF model: quant/layers.py) cannot take a merged weight: the LoRA is added to its
dequantized weight in each forward instead (quant.layers.RuntimeLora, ComfyUI's way and stable-diffusion.cpp's
``at_runtime``), with the float32 steps of a merge, so the result has the bits of merging into the dequantized model.
"""

from __future__ import annotations

import functools
import glob
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from sdcli.formats.diffusers import rename, unet_prefix_pairs
from sdcli.formats.hashing import a1111_lora_hash, file_sha256
from sdcli.formats.safetensors import FLOAT_DTYPES, read_header
from sdcli.loading.lora_keys import Slot, denoiser_slots, is_text_key, peft_alphas, split_key, text_slots
from sdcli.quant.layers import RuntimeLora, add_update, holds_blocks
from sdcli.runtime import cuda_graphs
from sdcli.models.text import TextEncoder
from sdcli.models.unet import UNetConfig
from sdcli.runtime.errors import BadInputError, ModelNotFoundError, NumericalError, UsageError

UNET_KEY = "lora_unet_"
TEXT_KEY = "lora_te_"
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class LoraReport:
    """What one LoRA did to the model, for the stderr line and the image metadata."""

    path: Path
    sha256: str
    weight: float
    applied: int  # modules merged
    total: int  # modules named in the file

    @property
    def name(self) -> str:
        return self.path.stem  # A1111's name for a LoRA (<lora:name:w>, "Lora hashes")

    @property
    def short_hash(self) -> str:
        """A1111's shorthash of a LoRA file ("Lora hashes"): not the file's sha256 for safetensors (see
        formats/hashing.a1111_lora_hash), so that Civitai and A1111 recognise the LoRA."""
        return a1111_lora_hash(self.path)[:12]

    def message(self) -> str:
        text = f"lora {self.path.name}: applied {self.applied} of {self.total} modules (weight {self.weight:g})"
        missed = self.total - self.applied
        return text + (f"; {missed} match no module of this model" if missed else "")


def parse_spec(spec: str) -> LoraSpec:
    """``FILE[:WEIGHT]``; the split is only taken when the tail is a number, so ``C:\\x.safetensors`` works."""
    head, sep, tail = spec.rpartition(":")
    path, weight = Path(spec), 1.0
    if sep and head:
        try:
            weight, path = float(tail), Path(head)
        except ValueError:
            pass
    if not math.isfinite(weight):
        raise UsageError(f"option --lora: weight must be a finite number, got {spec!r}")
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such LoRA file")
    return LoraSpec(path, weight)


CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.",
                       "encoder.", "decoder.", "text_model.", "down_blocks.", "mid_block.", "up_blocks.",
                       "img_in.")  # fmt: skip


def check_file(spec: LoraSpec) -> dict:
    """The file's safetensors header, checked as a kohya LoRA from shapes alone, before any model loads
    (read_header's sniffing names a .ckpt, an HTML page, a truncated file)."""
    header = read_header(spec.path)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    bad = sorted(k for k, v in tensors.items() if v["dtype"] not in FLOAT_DTYPES)
    if bad:
        raise BadInputError(f"{spec.path}: LoRA tensor {bad[0]} is not floating point")
    for base, parts in _groups(spec.path, tensors).items():
        _check_shapes(spec.path, base, {part: tuple(v["shape"]) for part, v in parts.items()})
    return header


def _check_shapes(path: Path, base: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """down (rank, in[, kh, kw]), up (out, rank[, 1, 1]) with rank > 0, alpha a single number."""
    down, up = shapes["lora_down.weight"], shapes["lora_up.weight"]
    if len(down) not in (2, 4) or len(up) not in (2, 4):
        raise BadInputError(f"{path}: {base}: lora_down {list(down)} / lora_up {list(up)} are not 2-d or 4-d weights")
    if 0 in down or 0 in up:
        raise BadInputError(f"{path}: {base}: rank-0 or empty LoRA weights (lora_down {list(down)})")
    if up[1] != down[0] or len(up) == 4 and up[2:] != (1, 1):
        raise BadInputError(f"{path}: {base}: lora_up {list(up)} does not fit lora_down {list(down)}")
    alpha = shapes.get("alpha", ())
    if math.prod(alpha) != 1:
        raise BadInputError(f"{path}: {base}: alpha has shape {list(alpha)}, expected a single number")


def _part_slots(part: str, modules: tuple, unet_cfg) -> dict[str, Slot]:
    """LoRA module name (without .lora_*) -> the weight it adapts in one part of the model: the UNet (kohya's
    diffusers and LDM spellings), a diffusion transformer (lora_keys.denoiser_slots), or the text encoders
    (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``...). The modules may be meta-device skeletons
    (residency.skeleton): names and shapes are all that is read then."""
    if part == "unet" and not isinstance(unet_cfg, UNetConfig):
        return denoiser_slots(modules[0])
    if part == "text" and not all(isinstance(m, TextEncoder) for m in modules):
        return text_slots(modules, transformer_family=True)  # SD3, FLUX: T5 (or SD3's place for it) beside CLIP
    return {name: Slot(module) for name, module in _unet_family_targets(part, modules, unet_cfg).items()}


def _part_targets(part: str, modules: tuple, unet_cfg) -> dict[str, nn.Module]:
    """kohya name -> the whole Linear/Conv2d it adapts, in every family (kohya's own spellings)."""
    slots = _part_slots(part, modules, unet_cfg)
    return {k: s.module for k, s in slots.items() if k.startswith((UNET_KEY, "lora_te")) and s.rows is None}


def _unet_family_targets(part: str, modules: tuple, unet_cfg) -> dict[str, nn.Module]:
    """kohya name -> module of SD 1.x/2.x/SDXL: the UNet (diffusers and LDM spellings) or the CLIP encoders."""
    out: dict[str, nn.Module] = {}
    if part == "unet":
        to_diffusers = {ldm: d for d, ldm in unet_prefix_pairs(len(unet_cfg.channel_mult), unet_cfg.num_res_blocks,
                                                               unet_cfg.attention_levels)}  # fmt: skip
        for name, module in modules[0].named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                out[UNET_KEY + name.replace(".", "_")] = module
                diffusers = rename(name + ".weight", to_diffusers)  # rename wants a key below the prefix
                if diffusers is not None:
                    out[UNET_KEY + diffusers.removesuffix(".weight").replace(".", "_")] = module
    elif part == "text":
        for n, encoder in enumerate(modules):
            # kohya: lora_te_ for the one text encoder; SDXL's lora_te1_ (CLIP-L) and lora_te2_ (bigG)
            prefix = TEXT_KEY if len(modules) == 1 else f"lora_te{n + 1}_"
            for name, module in encoder.transformer.named_modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)):
                    out[prefix + "text_model_" + name.replace(".", "_")] = module  # kohya names CLIPTextModel's
    return out


MERGED_PARTS = ("unet", "text")  # the parts a LoRA changes


def _targets(models, skeletons: bool = False) -> dict[str, Slot]:
    """Every adapted module of the model; `skeletons`: parts not in memory as meta-device modules (not built)."""
    out: dict[str, Slot] = {}
    for part in MERGED_PARTS:
        modules = models.parts.skeleton(part) if skeletons else models.parts.get(part)
        out.update(_part_slots(part, tuple(modules) if part == "text" else (modules,), models.info.unet))
    return out


def _groups(path: Path, state: dict) -> dict[str, dict]:
    """{module name: {part: tensor or header entry}} with kohya's part names (lora_keys.split_key reads the other
    formats' suffixes); refuses full checkpoints and LyCORIS variants (LoHa, LoKr, DoRA) by key."""
    groups: dict[str, dict] = {}
    for key, t in state.items():
        if key.startswith(CHECKPOINT_PREFIXES):
            raise BadInputError(f"{path}: not a LoRA but model weights ({key}): pass a checkpoint as --model, "
                                "a VAE as --vae")  # fmt: skip
        split = split_key(key)
        if split is None:
            raise BadInputError(f"{path}: key {key}: only LoRA/LoCon (lora_down/lora_up/alpha or lora_A/lora_B) "
                                "keys are supported, not LyCORIS LoHa/LoKr/DoRA")  # fmt: skip
        base, part = split
        groups.setdefault(base, {})[part] = t
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise BadInputError(f"{path}: {base} lacks its lora_down or lora_up weight")
    return groups


def _weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The adapted weight's shape: its logical one for a layer holding GGML blocks (its `weight` is the bytes)."""
    return tuple(getattr(module, "weight_shape", None) or module.weight.shape)


def _check_fits(path: Path, base: str, up: tuple, down: tuple, target: tuple, rows=None) -> None:
    """up @ down must reshape to the target's weight (Linear (out, in), 1x1 or 3x3 conv (LoCon)), or to the rows
    of it that `rows` names."""
    out = up[0] if rows is None else sum(n for _, _, n in rows)
    fits = up[0] == out and math.prod(down[1:]) == math.prod(target[1:])
    if rows is None:
        fits = fits and up[0] == target[0]
    else:
        fits = fits and all(src + n <= up[0] and dst + n <= target[0] for src, dst, n in rows)
    if not fits:
        raise BadInputError(f"{path}: {base}: LoRA shape {list(up[:1]) + list(down[1:])} does not fit "
                            f"the model's {list(target)} (a LoRA for another model family?)")  # fmt: skip


def _factors(parts: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor, float]:
    """(up, down, alpha / rank) in float32 on `device`; no alpha: scale 1."""
    down, up = (parts[k].to(device, torch.float32) for k in ("lora_down.weight", "lora_up.weight"))
    rank = down.shape[0]  # shapes were checked from the header by check_file
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
    return up, down, alpha / rank


def _matched(spec: LoraSpec, groups: dict, targets: dict[str, Slot], family) -> dict[str, Slot]:
    """The file's modules this model has. None at all, or (a diffusion transformer) none of the file's
    diffusion-model modules, is a LoRA for another family: FLUX's CLIP-L is SD1's text encoder, and an SD1 LoRA
    must not apply its text half alone."""
    matched = {base: targets[base] for base in groups if base in targets}
    denoiser = [base for base in groups if not is_text_key(base)]
    dit = family.denoiser != "unet"
    if not matched or dit and denoiser and all(base not in matched for base in denoiser):
        example = next(iter(b for b in groups if b not in matched), "none")
        raise BadInputError(f"{spec.path}: no key of this LoRA matches the model: is it for another family "
                            f"than {family.title}? ({len(groups)} modules, e.g. {example})")  # fmt: skip
    return matched


@torch.no_grad()
def _merge(spec: LoraSpec, groups: dict, targets: dict[str, Slot], originals: dict[nn.Module, Tensor] | None,
           device: torch.device) -> None:  # fmt: skip
    """Merge one LoRA's matching modules into `targets` (weights replaced, in their dtype and device). The sum is
    taken on the run's `device` wherever the module waits (residency offload keeps it in CPU RAM), so a part
    merged there has the bytes it has merged in place. Several modules of the file may update row blocks of one
    weight (diffusers' to_q, to_k, to_v of our qkv): each is merged in turn, in the file's order."""
    for base in groups:  # in the file's order, as a module named twice (both spellings) always merged
        slot = targets.get(base)
        if slot is None:
            continue
        module = slot.module
        if holds_blocks(module):
            _add_runtime(spec, base, groups[base], slot, originals, device)
            continue
        w = module.weight
        here = w.to(device)
        up, down, ratio = _factors(groups[base], device)
        _check_fits(spec.path, base, tuple(up.shape), tuple(down.shape), tuple(here.shape), slot.rows)
        merged = add_update(here.float(), ratio * (up.flatten(1) @ down.flatten(1)), spec.weight, slot.rows)
        if not bool(torch.isfinite(merged).all()):
            raise NumericalError(f"{spec.path}: {base}: NaN or Inf after merging the LoRA")
        if originals is not None:
            originals.setdefault(module, w)
        # A new Parameter, not an in-place edit: the old tensor may be shared with a caller.
        module.weight = nn.Parameter(merged.to(w.dtype).to(w.device), requires_grad=False)


def _add_runtime(spec: LoraSpec, base: str, parts: dict[str, Tensor], slot: Slot,
                 originals: dict | None, device: torch.device) -> None:  # fmt: skip
    """One LoRA on a layer holding GGML blocks: its up/down factors kept (on the run's device) and added to the
    dequantized weight in every forward, in _merge's float32 steps (quant.layers.RuntimeLora, add_update)."""
    module = slot.module
    up, down, ratio = _factors(parts, device)
    _check_fits(spec.path, base, tuple(up.shape), tuple(down.shape), _weight_shape(module), slot.rows)
    lora = RuntimeLora(up, down, ratio, spec.weight, slot.rows)
    delta = (up.flatten(1) @ down.flatten(1)) * lora.ratio * lora.weight
    if not bool(torch.isfinite(delta).all()):
        raise NumericalError(f"{spec.path}: {base}: NaN or Inf in the LoRA's update")
    if originals is not None:
        originals.setdefault(module, tuple(module.loras))  # the layer's LoRAs before any of this set
    module.loras.append(lora)


def _read(spec: LoraSpec) -> dict:
    """The file's groups as tensors; a diffusers/PEFT file's alphas (its metadata's LoraConfig) as alpha tensors
    of the modules that have none of their own."""
    from safetensors.torch import load_file

    header = check_file(spec)
    groups = _groups(spec.path, load_file(str(spec.path)))
    bases = [(b, parts["lora_down.weight"].shape[0]) for b, parts in groups.items() if "alpha" not in parts]
    for base, alpha in peft_alphas(header.get("__metadata__"), bases).items():
        groups[base]["alpha"] = torch.tensor(alpha)
    return groups


def apply_lora(models, spec: LoraSpec, originals: dict[nn.Module, Tensor] | None = None) -> LoraReport:
    """Merge one LoRA into the whole of `models` (denoiser and text encoders, built if they are not in memory).
    `originals` collects each replaced module's weight from before any LoRA."""
    groups = _read(spec)
    targets = _targets(models)
    matched = _matched(spec, groups, targets, models.family)
    _merge(spec, groups, targets, originals, models.device)
    return LoraReport(spec.path, file_sha256(spec.path), spec.weight, len(matched), len(groups))


class LoraState:
    """The LoRAs merged into one loaded model right now, held by the render loop that changes them (the model
    itself stays as loaded, apart from the merged weights this object can take back out).

    Jobs that share one set merge it once. With `keep_originals` (asked for when the jobs of a run switch sets) the
    weights as loaded stay in memory, one more copy of every adapted module, so that another set can replace it.
    It watches the model's residency: a part built (or rebuilt) later gets the current set merged the same way,
    module by module in the same order, so its weights are the ones it would have had never released."""

    def __init__(self, models, keep_originals: bool = False):
        self.models, self.keep_originals = models, keep_originals
        self.key: list = []  # (resolved path, weight) of each merged LoRA, in order
        self.specs: list[LoraSpec] = []
        self.reports: list[LoraReport] = []  # what the merged LoRAs did: for the log and the image metadata
        self.originals: dict[str, dict[nn.Module, Tensor]] = {}  # part -> {module: weight before any LoRA}
        models.parts.watch("lora", self)

    def use(self, specs: list[LoraSpec]) -> list[LoraReport]:
        """Make `specs` the merged set; returns the reports of a new merge ([] when the set did not change).
        Every file is checked against the model's names and shapes before anything is merged."""
        key = [(s.path.resolve(), s.weight) for s in specs]
        if key == self.key:
            return []
        if self.key:
            if not self.keep_originals:
                raise RuntimeError("LoRA switch without the original weights kept")  # a bug, not bad input
            self.restore()
        reports = [self._report(s) for s in specs]
        self.specs, self.key, self.reports = list(specs), key, reports
        for part in MERGED_PARTS:
            value = self.models.parts.peek(part)
            if value is not None:
                self._merge_part(part, tuple(value) if part == "text" else (value,))
        unet = self.models.parts.peek("unet")
        if unet is not None:  # run-time LoRAs change no parameter a captured CUDA graph would see change
            cuda_graphs.forget(unet)
        return self.reports

    def restore(self) -> None:
        """Back to the weights as loaded, before the LoRAs merged with keep_originals."""
        for by_module in self.originals.values():
            for module, weight in by_module.items():
                if isinstance(weight, tuple):  # a layer holding GGML blocks: its run-time LoRAs as they were
                    module.loras[:] = weight
                    continue
                if weight.device != module.weight.device:  # moved by the residency since (offload)
                    weight = nn.Parameter(weight.to(module.weight.device), requires_grad=False)
                module.weight = weight
        self.originals, self.reports, self.key, self.specs = {}, [], [], []

    # residency watcher: a part built later gets the set merged; a released one takes its originals along
    def built(self, part: str, modules: tuple) -> None:
        if part in MERGED_PARTS and self.specs:
            self._merge_part(part, modules)

    def released(self, part: str, modules: tuple) -> None:
        self.originals.pop(part, None)

    def _report(self, spec: LoraSpec) -> LoraReport:
        """The file checked against the model from headers and module shapes alone (no part is built)."""
        header = check_file(spec)
        groups = _groups(spec.path, {k: v for k, v in header.items() if k != "__metadata__"})
        matched = _matched(spec, groups, _targets(self.models, skeletons=True), self.models.family)
        for base, slot in matched.items():
            parts = groups[base]
            _check_fits(spec.path, base, tuple(parts["lora_up.weight"]["shape"]),
                        tuple(parts["lora_down.weight"]["shape"]), _weight_shape(slot.module), slot.rows)
        return LoraReport(spec.path, file_sha256(spec.path), spec.weight, len(matched), len(groups))

    def _merge_part(self, part: str, modules: tuple) -> None:
        targets = _part_slots(part, modules, self.models.info.unet)
        originals = self.originals.setdefault(part, {}) if self.keep_originals else None
        for spec in self.specs:
            _merge(spec, _read(spec), targets, originals, self.models.device)


def resolve_prompt_lora(name: str, weight: float, lora_dir: str | None) -> LoraSpec:
    """A prompt's ``<lora:NAME:WEIGHT>``: NAME is a path, or a file stem found under lora_dir (in sub-folders
    too, as A1111 looks in models/Lora). Every file is then sniffed like a --lora file."""
    return LoraSpec(_find_lora(name, lora_dir), weight)


@functools.lru_cache(maxsize=256)
def _find_lora(name: str, lora_dir: str | None) -> Path:
    """Cached: a prompts file names the same LoRAs job after job, and a LoRA folder can be large."""
    direct = Path(name).expanduser()
    if direct.is_file():
        return direct
    where = "set --lora-dir (or lora_dir: in a config) to the folder that holds it"
    if not lora_dir:
        raise ModelNotFoundError(f"<lora:{name}> in the prompt: {where}")
    root = Path(lora_dir).expanduser()
    if not root.is_dir():
        raise ModelNotFoundError(f"lora_dir {root}: no such folder")
    found = sorted(p for p in root.rglob(f"{glob.escape(name)}.safetensors") if p.is_file())
    if not found:
        raise ModelNotFoundError(f"<lora:{name}> in the prompt: no {name}.safetensors under {root}")
    if len(found) > 1:
        raise UsageError(f"<lora:{name}> in the prompt: {len(found)} files match under {root} "
                         f"({', '.join(str(p.relative_to(root)) for p in found[:4])}); name one by its path")
    return found[0]

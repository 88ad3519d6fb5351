"""Diffusers folders of the diffusion-transformer families (SD3 / SD3.5, FLUX.1) seen under the single files' names:
``transformer/`` under ``model.diffusion_model.`` in Stability's / BFL's names, the text encoders where an SD3
single file keeps them (``text_encoders.clip_l/clip_g/t5xxl.transformer.``), ``vae/`` under ``first_stage_model.``.

diffusers splits what the original files fuse (each ``qkv``, a Flux single block's ``linear1``) and swaps the
(shift, scale) halves of the pre-only modulations: such a tensor becomes one Entry made of pieces (rows of stored
tensors concatenated along dim 0, formats/source.Entry.pieces), read straight into the fused weight by the
streaming loader, never assembled in a copy. Which names go together is the layout modules' forward rules
(sd3_layouts, flux_layouts), inverted here by matching their diffusers templates.
Upstream: diffusers ``pipelines/stable_diffusion_3`` and ``pipelines/flux`` (the folder's components);
``loaders/single_file_utils.py`` (the same conversions, the other way).
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from pathlib import Path
from typing import Callable

from sdcli.runtime.errors import BadInputError
from sdcli.formats import flux_layouts, sd3_layouts
from sdcli.formats.folders import component_files
from sdcli.formats.ldm import UNET_PREFIX
from sdcli.formats.safetensors import read_header
from sdcli.formats.sd3_layouts import QKV, SWAP
from sdcli.formats.source import Entry, entries_from_header

TRANSFORMER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
TEXT_FILES = ("model.safetensors", "model.fp16.safetensors")
TEXT = "text_encoders.{}.transformer."
# component folder -> the encoder's place in an SD3-style single file (families/sd3.py, flux.py), per denoiser
TEXT_PLACES = {
    "mmdit": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    "flux_dit": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}
Names = Callable[[str, int], tuple[tuple[str, ...], "str | None"]]


def is_dit_folder(folder: Path) -> bool:
    return (folder / "transformer").is_dir()


def _stored_template(pattern: str) -> str:
    """A rule's stored-name regex as a template: (\\d+) -> \\1, escaped dots -> dots."""
    return pattern.replace(r"(\d+)", r"\1").replace("\\.", ".")


def _as_regex(template: str) -> str:
    """A diffusers name template (``transformer_blocks.\\1.attn.to_q``) as a regex capturing the block number."""
    return r"(\d+)".join(re.escape(part) for part in template.split("\\1"))


@lru_cache(maxsize=None)
def _inverse(layout: str) -> tuple[tuple[re.Pattern, str], ...]:
    """(diffusers-name regex with its suffix, stored-name template) for every name a layout's rules produce."""
    pairs: list[tuple[str, str, str]] = []  # (diffusers template, stored template, suffix group)
    if layout == "mmdit":
        rules = sd3_layouts.RULES
        pairs += [(whole, stored, "") for stored, whole in sd3_layouts.WHOLE.items()]
    else:
        rules = flux_layouts.RULES
        pairs += [(diff, _stored_template(stored), "norm") for stored, diff in flux_layouts.NORMS]
    for pattern, templates, _ in rules:
        pairs += [(t, _stored_template(pattern), "param") for t in templates]
    suffix = {"": "", "param": r"\.(weight|bias)", "norm": r"\.(weight)"}
    return tuple((re.compile(_as_regex(d) + suffix[s]), stored + {"": "", "param": ".", "norm": ".scale"}[s])
                 for d, stored, s in pairs)


def stored_name(key: str, layout: str, depth: int) -> str | None:
    """The original file's name of the tensor a diffusers transformer key is (part of), or None."""
    names_of = _names_fn(layout)
    for regex, template in _inverse(layout):
        if m := regex.fullmatch(key):
            number = next((g for g in m.groups() if g and g.isdigit()), None)
            stored = template.replace("\\1", number or "")
            if template.endswith("."):
                stored += m.groups()[-1]
            try:
                if key in names_of(stored, depth)[0]:
                    return stored
            except KeyError:
                continue
    return None


def _names_fn(layout: str) -> Names:
    return sd3_layouts.diffusers_names if layout == "mmdit" else flux_layouts.diffusers_names


def composed(stored: str, names: tuple[str, ...], op: str | None, found: dict[str, Entry], where: Path) -> Entry:
    """The Entry of one original tensor made of its diffusers tensors: itself renamed, the concatenation of
    several (QKV), or its two halves swapped (SWAP)."""
    missing = [n for n in names if n not in found]
    if missing:
        raise BadInputError(f"{where}: {missing[0]} is missing (with {', '.join(names)} it makes {stored})")
    parts = [found[n] for n in names]
    if op == SWAP:
        e = parts[0]
        half = e.shape[0] // 2
        return dataclasses.replace(e, pieces=((e, half, e.shape[0]), (e, 0, half)))
    if op != QKV:
        return parts[0]
    if len({p.dtype for p in parts}) > 1 or len({p.shape[1:] for p in parts}) > 1:
        raise BadInputError(f"{where}: {', '.join(names)} differ in dtype or width; they make one tensor {stored}")
    rows = sum(p.shape[0] for p in parts)
    return dataclasses.replace(parts[0], shape=(rows, *parts[0].shape[1:]),
                               pieces=tuple((p, 0, p.shape[0]) for p in parts))


def transformer_entries(folder: Path) -> tuple[str, dict[str, Entry]]:
    """(layout "mmdit" | "flux_dit" (Family.denoiser's names), the transformer's entries under the original names
    after ``model.diffusion_model.``).
    A diffusers tensor no rule names is kept as ``unmapped.*`` so the strict load lists it."""
    found: dict[str, Entry] = {}
    for f in component_files(folder, TRANSFORMER_FILES):
        found.update(entries_from_header(f, read_header(f)))
    layout = "flux_dit" if any(k.startswith("single_transformer_blocks.") for k in found) else "mmdit"
    depth = 1 + max((int(m.group(1)) for k in found if (m := re.match(r"transformer_blocks\.(\d+)\.", k))), default=-1)
    names_of = _names_fn(layout)
    out: dict[str, Entry] = {}
    for key in found:
        stored = stored_name(key, layout, depth)
        if stored is None:
            out[f"unmapped.{key}"] = found[key]
        elif UNET_PREFIX + stored not in out:
            names, op = names_of(stored, depth)
            out[UNET_PREFIX + stored] = composed(stored, names, op, found, folder)
    return layout, out


def text_entries(folder: Path, place: str) -> dict[str, Entry]:
    """One text encoder folder (transformers names) at its single-file place; CLIP keys get ``text_model.``."""
    prefix = TEXT.format(place)
    clip = place != "t5xxl"
    out: dict[str, Entry] = {}
    for f in component_files(folder, TEXT_FILES):
        out.update(entries_from_header(f, read_header(f), prefix, _clip_name if clip else None))
    return out


def _clip_name(key: str) -> str:
    return key if key == "text_projection.weight" else "text_model." + key.removeprefix("text_model.")


def dit_folder_entries(folder: Path) -> dict[str, Entry]:
    """Every component a diffusers SD3 / FLUX.1 folder holds, under single-file names (the VAE is read by the
    caller, formats/diffusers.py, as for the UNet families)."""
    layout, entries = transformer_entries(folder / "transformer")
    for component, place in TEXT_PLACES[layout].items():
        if (folder / component).is_dir():
            entries.update(text_entries(folder / component, place))
    return entries

"""`sdcli inspect` on the files made for a model rather than models themselves: LoRAs, textual-inversion embeddings,
TAESD files, VAE-only files and text encoders kept as files of their own (ComfyUI's clip_l / clip_g / t5xxl).

A file's kind is read from its safetensors header alone (`kind_of`); its report from the header and the metadata
(kohya's ss_* training keys); no tensor is read except by the hashes, which stream the file once. A pickled
embedding (.pt, .bin) is read through the one restricted loader (formats/pickle_ckpt.py): tensors and plain data.

Hashes as A1111 computes them (modules/hashes.py; extensions-builtin/Lora/network.py): a checkpoint's and an
embedding's are the sha256 of the whole file (infotext "Model hash": its first 10 digits, "TI hashes": 12); a
safetensors LoRA's is kohya's "addnet" hash, the sha256 of the bytes after the header (unless the file's metadata
gives it as sshs_model_hash), of which "Lora hashes" shows 12 digits.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from sdcli.formats.ldm import VAE_PREFIX, numel

# --- which kind ----------------------------------------------------------------------------------------------

LORA_SUFFIXES = {  # a key's ending -> the format that writes it (longest first where one ends another)
    ".lora_down.weight": "kohya", ".lora_up.weight": "kohya", ".alpha": "kohya",
    ".lora_A.weight": "diffusers (PEFT)", ".lora_B.weight": "diffusers (PEFT)", ".lora_A.bias": "diffusers (PEFT)",
    ".lora_B.bias": "diffusers (PEFT)", "_lora.down.weight": "diffusers (attention processor)",
    "_lora.up.weight": "diffusers (attention processor)", ".lora.down.weight": "diffusers (attention processor)",
    ".lora.up.weight": "diffusers (attention processor)", ".dora_scale": "DoRA", ".diff": "LyCORIS (full diff)",
    ".diff_b": "LyCORIS (full diff)", ".lokr_w1": "LyCORIS LoKr", ".lokr_w2": "LyCORIS LoKr",
    ".lokr_w1_a": "LyCORIS LoKr", ".lokr_w1_b": "LyCORIS LoKr", ".lokr_w2_a": "LyCORIS LoKr",
    ".lokr_w2_b": "LyCORIS LoKr", ".lokr_t2": "LyCORIS LoKr", ".hada_w1_a": "LyCORIS LoHa",
    ".hada_w1_b": "LyCORIS LoHa", ".hada_w2_a": "LyCORIS LoHa", ".hada_w2_b": "LyCORIS LoHa",
    ".hada_t1": "LyCORIS LoHa", ".hada_t2": "LyCORIS LoHa",
}  # fmt: skip
DOWN_SUFFIXES = (".lora_down.weight", ".lora_A.weight", "_lora.down.weight", ".lora.down.weight")
TEXT_LORA = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.|te\d?\.|lora_te\d?\.)")
VAE_KEYS = ("encoder.conv_in.weight", "decoder.conv_in.weight")
VAE_STEMS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "loss.")
SDCLI_TENSOR_FILE = {"latent", "latent_tensor", "cond"}  # sdcli's own latent and conditioning files


def kind_of(header: dict) -> str | None:
    """lora, textual_inversion, taesd, vae or text_encoder from a safetensors header; None for anything else
    (checkpoints, ControlNets, upscalers and sdcli's own files are told apart elsewhere)."""
    from sdcli.models.taesd import is_taesd

    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    if not shapes or set(shapes) & SDCLI_TENSOR_FILE:
        return None
    if all(_lora_suffix(k) for k in shapes):
        return "lora"
    if _embedding_widths(shapes) is not None:
        return "textual_inversion"
    if is_taesd(shapes):
        return "taesd"
    if _vae_keys(shapes) is not None:
        return "vae"
    if _text_encoder(shapes) is not None:
        return "text_encoder"
    return None


def _lora_suffix(key: str) -> str | None:
    return next((s for s in LORA_SUFFIXES if key.endswith(s)), None)


def _embedding_widths(shapes: dict) -> dict[str, int] | None:
    """An embedding's encoder keys -> widths as text/embeddings.py reads the file: kohya's emb_params, SDXL's
    clip_l + clip_g, or a single tensor of 1 or 2 dimensions (diffusers' learned_embeds); None otherwise."""
    if set(shapes) == {"clip_l", "clip_g"} and all(len(s) == 2 for s in shapes.values()):
        return {k: shapes[k][1] for k in ("clip_l", "clip_g")}
    if len(shapes) == 1:
        (key, shape), = shapes.items()
        if len(shape) in (1, 2) and "." not in key and all(shape):
            return {"*": shape[-1]}
    return None


def _vae_keys(shapes: dict) -> dict | None:
    """The shapes under bare LDM / diffusers VAE names (first_stage_model. or vae. dropped), or None."""
    for prefix in ("", VAE_PREFIX, "vae."):
        inner = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
        if len(inner) == len(shapes) and all(k in inner for k in VAE_KEYS) and all(k.startswith(VAE_STEMS)
                                                                                     for k in inner):  # fmt: skip
            return inner
    return None


def _text_encoder(shapes: dict) -> dict[str, Any] | None:
    """What a text-encoder-only file is: CLIP in transformers names (text_model. or bare), OpenCLIP, or T5."""
    keys = list(shapes)
    for prefix in ("text_model.", ""):
        token = shapes.get(prefix + "embeddings.token_embedding.weight")
        if token is not None and any(k.startswith(prefix + "encoder.layers.") for k in keys):
            projection = shapes.get("text_projection.weight")
            return {"encoder": "CLIP", "width": token[1],
                    "layers": _count(keys, re.escape(prefix) + r"encoder\.layers\.(\d+)\."),
                    "projection": list(projection) if projection else None}
    if "token_embedding.weight" in shapes and any(k.startswith("transformer.resblocks.") for k in keys):
        return {"encoder": "OpenCLIP", "width": shapes["token_embedding.weight"][1],
                "layers": _count(keys, r"transformer\.resblocks\.(\d+)\."),
                "projection": list(shapes["text_projection"]) if "text_projection" in shapes else None}
    embed = shapes.get("shared.weight") or shapes.get("encoder.embed_tokens.weight")
    if embed is not None and any(k.startswith("encoder.block.") for k in keys):
        return {"encoder": "T5", "width": embed[1], "layers": _count(keys, r"encoder\.block\.(\d+)\.")}
    return None


def _count(keys: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


# --- reports -------------------------------------------------------------------------------------------------

def report(path: Path, header: dict, kind: str, hashes: bool) -> dict[str, Any]:
    """The report of one file of a kind kind_of found."""
    build = {"lora": _lora, "textual_inversion": _embedding_st, "taesd": _taesd, "vae": _vae,
             "text_encoder": _text}[kind]  # fmt: skip
    out = {"kind": kind, "path": str(path), **build(path, header)}
    out.update(_summary(header))
    if hashes:
        out.update(_kind_hashes(path, kind, header.get("__metadata__") or {}))
    return out


def _summary(header: dict) -> dict[str, Any]:
    dtypes: Counter = Counter(v["dtype"] for k, v in header.items() if k != "__metadata__")
    return {"tensors": sum(dtypes.values()), "parameters": sum(numel(v["shape"]) for k, v in header.items()
                                                               if k != "__metadata__"),
            "dtypes": dict(dtypes)}  # fmt: skip


def _family_names(families) -> list[str]:
    """In the registry's reverse order: oldest family first (the registry asks the most specific first)."""
    from sdcli.families import FAMILIES

    return [f.name for f in reversed(FAMILIES) if f in families]


# LoRA

def _lora(path: Path, header: dict) -> dict[str, Any]:
    meta = header.get("__metadata__") or {}
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    formats = Counter(LORA_SUFFIXES[_lora_suffix(k)] for k in shapes)
    modules = {k[: -len(_lora_suffix(k))] for k in shapes}
    ranks = sorted({shapes[k][0] for k in shapes if k.endswith(DOWN_SUFFIXES)})
    text = sorted(m for m in modules if TEXT_LORA.match(m))
    out: dict[str, Any] = {"format": " + ".join(f for f, _ in formats.most_common()), **_lora_family(shapes, meta),
                           "rank": ranks[0] if len(ranks) == 1 else ranks, "modules": len(modules),
                           "unet_modules": len(modules) - len(text), "text_encoder_modules": len(text)}
    if any(len(shapes[k]) == 4 and shapes[k][2:] != (1, 1) for k in shapes if k.endswith(DOWN_SUFFIXES)):
        out["format"] += " (LoCon: convolutions too)"
    if meta.get("ss_network_alpha"):
        out["alpha"] = meta["ss_network_alpha"]
    out.update(_training(meta))
    return out


def _lora_family(shapes: dict, meta: dict) -> dict[str, Any]:
    """From the shapes when they show a released model's width (or SDXL's two text encoders, or a DiT's blocks),
    else from the training metadata, as A1111 does; with where it was read."""
    from sdcli.families import addons

    width = next((s[1] for k, s in shapes.items() if k.endswith(DOWN_SUFFIXES) and re.search(r"attn2[._]to_k", k)),
                 None)  # the cross-attention's input: the UNet's context width
    two_encoders = any(re.match(r"^(lora_te[12]_|te[12]\.|text_encoder_2\.)", k) for k in shapes)
    family = addons.by_dit_stems(shapes) or (addons.SDXL if two_encoders else None) or \
        (addons.by_context(width) if width else None)  # fmt: skip
    if family is not None:
        return {"family": family.name, "family_from": "shapes"}
    out = {"context_width": width} if width else {}
    named = addons.by_metadata(meta)
    return {**out, "family": named.name, "family_from": "metadata"} if named else {**out, "family": None}


TRAINING_KEYS = {  # kohya's ss_* keys worth a line, in the order A1111's metadata panel puts the first ones
    "ss_sd_model_name": "base model", "ss_resolution": "resolution", "ss_clip_skip": "clip skip",
    "ss_num_train_images": "train images", "ss_num_epochs": "epochs", "ss_epoch": "epoch",
    "ss_max_train_steps": "steps", "ss_learning_rate": "learning rate", "ss_unet_lr": "UNet learning rate",
    "ss_text_encoder_lr": "text encoder learning rate", "ss_network_module": "network module",
    "ss_network_dim": "network dim", "ss_mixed_precision": "precision", "ss_output_name": "output name",
    "ss_training_comment": "comment", "ss_training_started_at": "started at",
}  # fmt: skip
MAX_TAGS = 20


def _training(meta: dict) -> dict[str, Any]:
    """Trigger words (the most frequent training tags, kohya's ss_tag_frequency, and modelspec's trigger phrase)
    and the training settings; every other metadata key is in header_metadata."""
    out: dict[str, Any] = {}
    trigger = meta.get("modelspec.trigger_phrase")
    if trigger:
        out["trigger_phrase"] = trigger
    tags = _tag_frequency(meta.get("ss_tag_frequency"))
    if tags:
        out["tags"] = dict(tags.most_common(MAX_TAGS))
    training = {label: meta[key][:200] for key, label in TRAINING_KEYS.items()
                if meta.get(key) not in (None, "", "None")}
    if training:
        out["training"] = training
    rest = {k: v[:200] for k, v in meta.items() if k not in TRAINING_KEYS and k not in ("ss_tag_frequency",
                                                                                          "ss_dataset_dirs")}
    if rest:
        out["header_metadata"] = rest
    return out


def _tag_frequency(text: str | None) -> Counter:
    """{dataset folder: {tag: count}} summed over the folders; anything malformed counts as no tags."""
    total: Counter = Counter()
    try:
        data = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        return total
    for tags in data.values() if isinstance(data, dict) else ():
        if isinstance(tags, dict):
            total.update({str(t).strip(): c for t, c in tags.items() if isinstance(c, int) and str(t).strip()})
    return total


# textual-inversion embeddings

def _embedding_st(path: Path, header: dict) -> dict[str, Any]:
    shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    widths = _embedding_widths(shapes)
    vectors = next(iter(shapes.values()))[0] if len(next(iter(shapes.values()))) == 2 else 1
    fmt = "SDXL (clip_l + clip_g)" if "clip_g" in widths else "kohya (emb_params)" if "emb_params" in shapes \
        else f"diffusers (learned_embeds, key {next(iter(shapes))!r})"  # fmt: skip
    return {"format": fmt, **_embedding_fields(path, vectors, widths)}


def _embedding_fields(path: Path, vectors: int, widths: dict[str, int]) -> dict[str, Any]:
    from sdcli.families import addons

    family = addons.by_embedding(widths)
    out = {"trigger": path.stem, "vectors": vectors, "widths": widths,
           "family": family.name if family is not None else None}
    if family is None:
        out["note"] = f"width {', '.join(map(str, widths.values()))} is no released model's: it fits a model " \
                      "whose text encoder has that width"  # fmt: skip
    return out


def pickled_embedding(path: Path, hashes: bool) -> dict[str, Any] | None:
    """A .pt / .bin textual-inversion file (A1111's dict, diffusers' learned_embeds), or None when the pickle holds
    something else. Read through the restricted loader."""
    from sdcli.runtime.errors import BadInputError
    from sdcli.text.embeddings import _load_data, vectors_from_data

    try:
        data = _load_data(path)
        vectors = vectors_from_data(data, path)
    except BadInputError:
        return None
    widths = {("*" if k == "*" else k): v.shape[1] for k, v in vectors.items()}
    rows = next(iter(vectors.values())).shape[0]
    fmt = "A1111 (string_to_param)" if "string_to_param" in data else "diffusers (learned_embeds)"
    out = {"kind": "textual_inversion", "path": str(path), "format": fmt, **_embedding_fields(path, rows, widths)}
    trained = {k: str(data[k])[:200] for k in ("name", "step", "sd_checkpoint", "sd_checkpoint_name") if k in data}
    if trained:
        out["training"] = trained
    if hashes:
        out.update(_kind_hashes(path, "textual_inversion", {}))
    return out


# TAESD, VAE, text encoders

def _taesd(path: Path, header: dict) -> dict[str, Any]:
    from sdcli.families import FAMILIES
    from sdcli.loading.vae import taesd_kind
    from sdcli.models.taesd import ENCODER_LAST, is_autoencoder_tiny, is_taesd_decoder, shapes_of

    shapes = shapes_of(header)
    if is_autoencoder_tiny(shapes):  # decoder.layers.0 is the original decoder's 1 (diffusers moved the clamp)
        parts = [p for p in ("encoder", "decoder") if any(k.startswith(p + ".") for k in shapes)]
        layout = "diffusers (AutoencoderTiny)"
        first, last = shapes.get("decoder.layers.0.weight"), shapes.get(f"encoder.layers.{ENCODER_LAST}.weight")
        channels, width = (first[1], first[0]) if first else (last[0], last[1])
    elif is_taesd_decoder(shapes):
        parts, layout = ["decoder"], "madebyollin (taesd_decoder)"
        channels, width = shapes["1.weight"][1], shapes["1.weight"][0]
    else:
        parts, layout = ["encoder"], "madebyollin (taesd_encoder)"
        channels, width = shapes[f"{ENCODER_LAST}.weight"][0], shapes["0.weight"][0]
    named = taesd_kind(path)
    fits = [f for f in FAMILIES if f.supported and f.latent.taesd == named and f.latent.channels == channels]
    out = {"parts": parts, "layout": layout, "latent_channels": channels, "width": width,
           "named": named, "families": _family_names(fits)}
    if named is None:
        out["note"] = "the file name says neither taesd, taesdxl, taesd3 nor taef1: sdcli takes it for the family " \
                      "of the model it is used with (its latent channels are checked)"  # fmt: skip
    return out


def _vae(path: Path, header: dict) -> dict[str, Any]:
    from sdcli.families import FAMILIES

    shapes = _vae_keys({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    channels = shapes["decoder.conv_in.weight"][1]
    layout = "diffusers" if any(k.startswith("encoder.down_blocks.") for k in shapes) else "LDM"
    fits = [f for f in FAMILIES if f.supported and f.latent.channels == channels]
    return {"layout": layout, "latent_channels": channels, "quant_conv": "quant_conv.weight" in shapes,
            "base_channels": shapes["encoder.conv_in.weight"][0], "families": _family_names(fits),
            "note": "families of one latent space share a VAE's shapes: its name says which it was trained for"}


def _text(path: Path, header: dict) -> dict[str, Any]:
    from sdcli.families import addons

    found = _text_encoder({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    known = addons.TEXT_FILES.get(found["width"])
    if found["encoder"] == "T5" and found["width"] != 4096:
        known = None
    out = {**{k: v for k, v in found.items() if v is not None}, "known_as": known[0] if known else None,
           "families": _family_names(known[1]) if known else []}
    return out


# --- hashes --------------------------------------------------------------------------------------------------

def safetensors_hashes(path: Path) -> dict[str, str]:
    """sha256 of the file, A1111's AutoV2 short hash (its first 10 hex) and AutoV3 (the sha256 of the bytes after
    the safetensors header: kohya's addnet hash), in one streamed pass."""
    full, body = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_bytes = f.read(int.from_bytes(prefix, "little"))
        full.update(prefix + header_bytes)
        for block in iter(lambda: f.read(1 << 24), b""):
            full.update(block)
            body.update(block)
    digest = full.hexdigest()
    return {"sha256": digest, "autov2": digest[:10], "autov3": body.hexdigest()}


def _kind_hashes(path: Path, kind: str, meta: dict) -> dict[str, str]:
    """The hashes and the short one A1111 writes in an image's infotext for this kind of file."""
    if path.suffix.lower() != ".safetensors":
        from sdcli.formats.hashing import file_sha256

        digest = file_sha256(path)
        out = {"sha256": digest, "autov2": digest[:10]}
    else:
        out = safetensors_hashes(path)
    if kind == "lora":  # A1111: the metadata's sshs_model_hash, else the addnet hash (a pickle: the whole file's)
        from sdcli.formats.hashing import a1111_lora_hash

        out["a1111_hash"] = a1111_lora_hash(path)[:12]
    elif kind == "textual_inversion":
        out["a1111_hash"] = out["sha256"][:12]
    return out

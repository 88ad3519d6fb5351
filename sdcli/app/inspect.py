"""`sdcli inspect`: explain a checkpoint, an image's generation metadata, a latent or embedding file, or a prompt.

The report is data, so it goes to stdout: `key: value` lines, or one JSON object with --json. Checkpoints are read
from the header only (plus one streamed pass for the hashes, which --no-hash skips); no weights are loaded.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import typer

from sdcli.runtime import console
from sdcli.runtime.errors import BadInputError, SdcliError, UnsupportedModelError, UsageError

PARTS = {"model.diffusion_model.": "unet", "first_stage_model.": "vae", "cond_stage_model.": "text_encoder",
         "conditioner.embedders.0.": "text_encoder", "conditioner.embedders.1.": "text_encoder_2",
         "text_encoders.clip_l.": "text_encoder", "text_encoders.clip_g.": "text_encoder_2",
         "text_encoders.t5xxl.": "text_encoder_3"}  # the last three: SD3-style files (diffusers' component names)
IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"RIFF", b"GIF8")


def run_inspect(paths: list[Path], prompt: str | None, hashes: bool, json_out: bool,
                embeddings_dir: str | None = None, listing: bool = False, kinds: list[str] | None = None,
                config_file: Path | None = None) -> None:
    """One report per path (a block of `key: value` lines, or one JSON line each); a path that cannot be read
    prints its error line and the others still print; the exit code is then the highest of their errors'."""
    if listing:
        from sdcli.app.inspect_list import run_list

        return run_list(paths, kinds, config_file, json_out, inspect_path)
    if kinds:
        raise UsageError("--kind chooses what --list shows: give --list too")
    if bool(paths) == (prompt is not None):
        raise UsageError("give PATHs to inspect or --prompt TEXT")
    if prompt is not None:
        report = _prompt_report(prompt, embeddings_dir)
        return typer.echo(json.dumps(report, ensure_ascii=False)) if json_out else _print_prompt(report)
    worst = 0
    for n, path in enumerate(paths):
        try:
            report = inspect_path(path, hashes)
        except SdcliError as e:
            console.error(str(e))
            worst = max(worst, e.exit_code)
            continue
        if json_out:
            typer.echo(json.dumps(report, ensure_ascii=False))
            continue
        if n:
            typer.echo("")  # a blank line between two files' blocks
        _print_report({k: v for k, v in report.items() if k != "raw"})  # --json keeps the raw text chunks
    if worst:
        raise typer.Exit(worst)


def inspect_path(path: Path, hashes: bool = True) -> dict[str, Any]:
    if not path.exists():
        raise BadInputError(f"{path}: no such file or folder")
    if path.is_dir():
        return _checkpoint_report(path, hashes)
    head = _head(path)
    if head.startswith(IMAGE_MAGIC) and not _is_safetensors(path):  # the header decides, not a magic number
        return _image_report(path)
    if _is_gguf(path):
        return _gguf_report(path, hashes)
    if path.suffix.lower() == ".pth":  # a pickle: an upscaler's usual file (others fail the header read below)
        upscaler = _upscaler_report(path, hashes)
        if upscaler is not None:
            return upscaler
    if path.suffix.lower() in PICKLED_PARTS:  # embeddings, TAESD .pth, a text encoder's pytorch_model.bin
        part = _pickled_report(path, hashes)
        if part is not None:
            return part
        if _is_pickle(path):  # a ControlNet .pth, a checkpoint under another suffix
            return _checkpoint_report(path, hashes)
    if path.suffix == ".latent" or _is_small_sdcli_file(path):
        return _tensor_file_report(path)
    part = _part_report(path, hashes)
    return part if part is not None else _checkpoint_report(path, hashes)


PICKLED_PARTS = (".pt", ".bin", ".pth")


def _is_pickle(path: Path) -> bool:
    from sdcli.formats.pickle_ckpt import is_pickle

    return is_pickle(path)


def _part_report(path: Path, hashes: bool) -> dict[str, Any] | None:
    """A LoRA, embedding, TAESD, VAE or text encoder .safetensors file (inspect_files.py), None for others."""
    from sdcli.app import inspect_files

    header = _header(path)
    kind = inspect_files.kind_of(header)
    return inspect_files.report(path, header, kind, hashes) if kind else None


def _pickled_report(path: Path, hashes: bool) -> dict[str, Any] | None:
    """A pickled embedding (A1111's .pt, diffusers' .bin) or a pickled state dict of a kind kind_of knows, read
    through the restricted loader; None for anything else (a checkpoint: its own path says what it is)."""
    import torch

    from sdcli.app import inspect_files
    from sdcli.formats.pickle_ckpt import is_pickle, load_pickle
    from sdcli.formats.safetensors import dtype_name

    if not is_pickle(path):
        return None
    embedding = inspect_files.pickled_embedding(path, hashes)
    if embedding is not None:
        return embedding
    data = load_pickle(path, "file")
    data = data.get("state_dict", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        return None
    header = {str(k): {"dtype": dtype_name(v), "shape": list(v.shape)} for k, v in data.items()}
    kind = inspect_files.kind_of(header)
    return inspect_files.report(path, header, kind, hashes) if kind else None


def _is_gguf(path: Path) -> bool:
    from sdcli.formats.gguf import is_gguf

    return is_gguf(path)


def _gguf_report(path: Path, hashes: bool) -> dict[str, Any]:
    """A GGUF file from its header: the family (as for any checkpoint), and per part the tensor types, the bytes
    they take and the bits per weight; the sha256 and A1111's short hash of the whole file with --hash."""
    from sdcli.formats.gguf import T5_ARCHS, ldm_names, read_gguf_header
    from sdcli.quant.dequantize import is_supported

    info = read_gguf_header(path)
    names = ldm_names(info)
    report: dict[str, Any] = {"kind": "checkpoint", "path": str(path), "format": f"GGUF v{info.version}",
                              "architecture": info.architecture, **_gguf_family(path)}  # fmt: skip
    parts: dict[str, dict[str, Any]] = {}
    for t in info.tensors.values():
        name = names[t.name]
        part = "t5" if info.architecture in T5_ARCHS else \
            next((p for prefix, p in PARTS.items() if name.startswith(prefix)), "other")  # fmt: skip
        entry = parts.setdefault(part, {"types": Counter(), "parameters": 0, "bytes": 0})
        entry["types"][t.qtype.name] += 1
        entry["parameters"] += _numel(list(t.shape))
        entry["bytes"] += t.nbytes
    for entry in (*parts.values(), total := _total(parts)):
        entry["types"] = dict(sorted(entry["types"].items()))
        entry["bits_per_weight"] = round(8 * entry["bytes"] / max(entry["parameters"], 1), 2)
    report.update(parts=parts, total=total, tensors=len(info.tensors))
    unread = sorted({t.qtype.name for t in info.tensors.values() if not is_supported(t.qtype)})
    if unread:
        report["unsupported_types"] = unread  # a load refuses these (exit 8)
    report["header_metadata"] = {k: str(v)[:200] for k, v in info.metadata.items() if not isinstance(v, list)}
    if hashes:
        from sdcli.formats.hashing import file_sha256

        digest = file_sha256(path)
        report.update(sha256=digest, autov2=digest[:10])
    return report


def _total(parts: dict[str, dict[str, Any]]) -> dict[str, Any]:
    types: Counter = Counter()
    for entry in parts.values():
        types.update(entry["types"])
    return {"types": types, "parameters": sum(e["parameters"] for e in parts.values()),
            "bytes": sum(e["bytes"] for e in parts.values())}  # fmt: skip


def _gguf_family(path: Path) -> dict[str, Any]:
    """family/prediction/inpaint as detection says; a file it cannot place (a T5 encoder, a denoiser whose other
    parts come from elsewhere) keeps the family its shapes show, or none, and the reason."""
    from sdcli.loading.checkpoint import detect

    try:
        info = detect(path)
    except (BadInputError, UnsupportedModelError) as e:
        return {"family": _family_only(path), "note": str(e)}
    return {"family": info.family, "prediction": info.prediction, "inpaint": info.inpaint}


def _family_only(path: Path) -> str | None:
    from sdcli.families import detect_family
    from sdcli.formats.gguf import header_view, read_gguf_header
    from sdcli.formats.ldm import shapes_of

    try:
        return detect_family(shapes_of(header_view(read_gguf_header(path)))).name
    except (BadInputError, UnsupportedModelError):
        return None


def _is_safetensors(path: Path) -> bool:
    """formats/safetensors.is_safetensors's test (a valid length and a JSON header that passes every check), asked
    of files that look like images, without importing torch: `inspect IMAGE` stays a fast command."""
    import struct

    from sdcli.formats.safetensors_header import decode_header

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 * 1024 * 1024):  # safetensors._MAX_HEADER
                return False
            decode_header(path, f.read(n), size - 8 - n)
    except (OSError, struct.error, BadInputError):
        return False
    return True


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError as e:
        raise BadInputError(f"{path}: cannot read ({e.strerror})") from None


def _is_small_sdcli_file(path: Path) -> bool:
    """Latent/embedding files hold one or two tensors; checkpoints hold hundreds."""
    from sdcli.formats.safetensors import read_header

    header = read_header(path)
    names = set(header) - {"__metadata__"}
    return bool(names & {"latent", "latent_tensor", "cond"}) and len(names) <= 3


def _image_report(path: Path) -> dict[str, Any]:
    from sdcli.output.metadata import read_image_metadata

    meta = read_image_metadata(path)
    return {"kind": "image", "path": str(path), **meta}


def _tensor_file_report(path: Path) -> dict[str, Any]:
    from sdcli.output import latents

    header = _header(path)
    if "cond" in header:
        emb = latents.load_embedding(path)
        return {"kind": "embedding", "path": str(path), "shape": list(emb.cond.shape),
                "chunks": emb.cond.shape[1] // 77, **_stats(emb.cond), "metadata": header.get("__metadata__", {})}
    lf = latents.load_latent(path)
    return {"kind": "latent", "path": str(path), "format": lf.format, "shape": list(lf.latent.shape),
            "scaled": lf.scaled, "scale_factor": lf.scale_factor, "family": lf.family,
            "source_size": lf.source_size, **_stats(lf.latent)}


def _header(path: Path) -> dict:
    from sdcli.formats.safetensors import read_header

    return read_header(path)


def _stats(t) -> dict[str, float]:
    t = t.float()
    return {"mean": round(t.mean().item(), 5), "std": round(t.std().item(), 5),
            "min": round(t.min().item(), 5), "max": round(t.max().item(), 5)}


def _checkpoint_report(path: Path, hashes: bool) -> dict[str, Any]:
    from sdcli.loading.checkpoint import detect
    from sdcli.control.settings import inspect_report
    from sdcli.formats.safetensors import read_header

    upscaler = _upscaler_report(path, hashes)  # first: ControlNet's T2I-Adapter test takes an RRDBNet's `body.N`
    if upscaler is not None:
        return upscaler
    controlnet = inspect_report(path, hashes)
    if controlnet is not None:
        return controlnet

    try:
        info = detect(path)
    except (BadInputError, UnsupportedModelError) as e:  # detection of a header alone does not name the file
        raise e if str(path) in str(e) else type(e)(f"{path}: {e}") from None
    report: dict[str, Any] = {"kind": "checkpoint", "path": str(path), "family": info.family,
                              "prediction": info.prediction, "inpaint": info.inpaint}
    if path.is_file() and path.suffix != ".ckpt":
        header = read_header(path)
        report.update(_header_summary(_as_single_file(header)))
        if info.spec.denoiser != "unet":  # diffusers calls a diffusion transformer "transformer"
            report["parameters"] = {("transformer" if k == "unet" else k): v for k, v in report["parameters"].items()}
        if hashes:
            report.update(_hashes(path, header))
    elif path.is_dir():
        report.update(_folder_summary(path))
    return report


def _upscaler_report(path: Path, hashes: bool) -> dict[str, Any] | None:
    """An upscaler file (ESRGAN, Real-ESRGAN, Compact; other architectures through spandrel): what it is, its
    scale and purpose, what sizes it takes and how `upscale` tiles it. None for anything that is not one: a
    .safetensors file by its header, a .pth (an upscaler's usual suffix) by its tensors; other pickles (.ckpt)
    are not read twice."""
    from sdcli.upscale import files

    if path.is_dir() or path.suffix.lower() not in (".pth", ".safetensors"):
        return None
    try:
        stored = files.read_stored(path)
        layout = files.classify(set(stored.entries))
    except (BadInputError, UnsupportedModelError):
        return None  # not an upscaler's tensors: the checkpoint path says what the file is
    if layout == "other" and not any(test(set(stored.entries)) for test, _ in files.SPANDREL_NAMES):
        return None
    info = files.inspect_upscaler(path)
    report = {"kind": "upscaler", "path": str(path), **files.describe(path, info), **_upscaler_sizes(info.config)}
    if hashes:
        from sdcli.formats.hashing import file_sha256

        report["sha256"] = file_sha256(path)
    return report


def _upscaler_sizes(cfg) -> dict[str, Any]:
    """What input sizes it takes and how `sdcli upscale` runs it: ESRGAN and Compact take any size (an x2 or x1
    RRDBNet pads to a multiple of its pixel-unshuffle factor itself); every model runs in tiles of 512 px with
    32 px shared between neighbours by default (--tile, --tile-overlap)."""
    from sdcli.upscale import tiled

    multiple = getattr(cfg, "unshuffle", 1) if cfg is not None else None
    sizes = ("any" if multiple == 1 else f"any (padded to a multiple of {multiple})" if multiple
             else "as spandrel requires")
    return {"input_size": sizes, "tiling": f"tiles of {tiled.DEFAULT_TILE} px, {tiled.DEFAULT_OVERLAP} px overlap "
                                           "by default (--tile, --tile-overlap); 0 = untiled"}


def _folder_summary(folder: Path) -> dict[str, Any]:
    """dtypes and parameters per part of a diffusers folder, from the safetensors headers of its parts."""
    from sdcli.formats.safetensors import read_header

    dtypes: Counter = Counter()
    params: dict[str, int] = {}
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for file in sorted((folder / part).glob("*.safetensors")):
            for name, entry in read_header(file).items():
                if name == "__metadata__":
                    continue
                dtypes[entry["dtype"]] += 1
                params[part] = params.get(part, 0) + _numel(entry["shape"])
    return {"dtypes": dict(dtypes), "parameters": params}


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _as_single_file(header: dict) -> dict:
    """A diffusion transformer saved alone (BFL's files) seen under model.diffusion_model., as the loader sees it."""
    from sdcli.formats.ldm import UNET_PREFIX, bare_denoiser

    if not bare_denoiser(k for k in header if k != "__metadata__"):
        return header
    return {(k if k == "__metadata__" else UNET_PREFIX + k): v for k, v in header.items()}


def _header_summary(header: dict) -> dict[str, Any]:
    dtypes: Counter = Counter()
    params: Counter = Counter()
    other = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtypes[entry["dtype"]] += 1
        part = next((p for prefix, p in PARTS.items() if name.startswith(prefix)), None)
        params[part or "other"] += _numel(entry["shape"])
        if part is None:
            other.append(name)
    return {"dtypes": dict(dtypes), "parameters": dict(params), "tensors": len(header) - ("__metadata__" in header),
            "other_keys": sorted(other)[:50], "header_metadata": header.get("__metadata__", {})}


def _hashes(path: Path, header: dict) -> dict[str, str]:
    from sdcli.app.inspect_files import safetensors_hashes

    return safetensors_hashes(path)


def _prompt_report(prompt: str, embeddings_dir: str | None = None) -> dict[str, Any]:
    from sdcli import config as cfgmod
    from sdcli.families import DEFAULT
    from sdcli.text.prompts import describe_prompt, split_extra_networks
    from sdcli.text.clip_tokenizer import get_tokenizer

    from sdcli.text.editing import prompt_schedule

    tok = get_tokenizer()
    folder = cfgmod.resolve({"embeddings_dir": embeddings_dir}).embeddings_dir  # the flag, else a user config's
    library = None
    if folder:  # no model here: every file is taken as it is (a width that does not fit shows at render time)
        from sdcli.text.embeddings import EmbeddingLibrary

        library = EmbeddingLibrary(folder, None, tok.encode, console.info)
    text, loras = split_extra_networks(prompt)  # what the text encoder sees, and the LoRAs the tags name
    schedule = prompt_schedule(text, SCHEDULE_STEPS)  # [from:to:when] edits: tokens of the last text, as --dry-run
    report = {"kind": "prompt", **describe_prompt(schedule[-1][1], tok, DEFAULT.text[0].pad_id, library),
              "text": text}
    if len(schedule) > 1:
        report["prompt_schedule"] = [{"until_step": end, "text": t} for end, t in schedule]
    return {**report, "loras": [{"name": t.name, "weight": t.weight} for t in loras]}


SCHEDULE_STEPS = 20  # inspect has no --steps: a prompt's edits are shown for the default 20


def _print_prompt(report: dict[str, Any]) -> None:
    """One line per 75-token chunk: the tokens, with a weight after each one that is not 1."""
    typer.echo(f"prompt: {report['text']}")
    for entry in report.get("prompt_schedule", []):
        typer.echo(f"until step {entry['until_step']} of {SCHEDULE_STEPS}: {entry['text']}")
    typer.echo(f"tokens: {report['n_tokens']} in {report['n_chunks']} chunk(s) of 75")
    for number, chunk in enumerate(report["chunks"], start=1):
        # weights[0] belongs to the start token; the chunk's tokens follow it.
        words = [tok.replace("</w>", "") + ("" if w == 1.0 else f"({w:g})")
                 for tok, w in zip(chunk["tokens"], chunk["weights"][1:])]
        typer.echo(f"chunk {number} ({chunk['n_tokens']} tokens): {' '.join(words)}")
    typer.echo(f"ids: {report['ids']}")
    for lora in report["loras"]:
        typer.echo(f"lora: {lora['name']} (weight {lora['weight']:g})")
    for emb in report["embeddings"]:
        typer.echo(f"embedding: {emb['name']} ({emb['vectors']} vector{'s' if emb['vectors'] != 1 else ''}, "
                   f"{emb['file']})")


def _print_report(report: dict[str, Any], indent: str = "") -> None:
    """Plain `key: value` lines (no markup: values may be user text)."""
    for key, value in report.items():
        if isinstance(value, dict) and value:
            typer.echo(f"{indent}{key}:")
            _print_report(value, indent + "  ")
        elif isinstance(value, list) and value and isinstance(value[0], (dict, list)):
            typer.echo(f"{indent}{key}: {json.dumps(value, ensure_ascii=False)}")
        else:
            typer.echo(f"{indent}{key}: {value if not isinstance(value, list) else ', '.join(map(str, value))}")

"""Generation metadata in images: write A1111 infotext, read sdcli / A1111 / ComfyUI / stable-diffusion.cpp.

This module stays light (no torch import) so that `sdcli inspect image.png` is instant.

Formats read (all found in PNG text chunks; A1111 JPEG/WebP keep theirs in the EXIF UserComment):
- sdcli: iTXt chunk `sdcli` = json.dumps(full metadata dict), next to an A1111 `parameters` text.
- A1111 infotext (`parameters`):
  https://github.com/AUTOMATIC1111/stable-diffusion-webui/blob/master/modules/infotext_utils.py
  "PROMPT\\nNegative prompt: NEG\\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, ..."
  The last line holds `Key: value` pairs separated by ", "; A1111 JSON-quotes values holding ',' or ':'.
- stable-diffusion.cpp (`parameters`, examples/common get_image_params): the same shape, but the schedule is
  appended to the sampler ("Sampler: euler_a karras"), sampler names are sd.cpp's own, and the last pair is
  "Version: stable-diffusion.cpp".
- ComfyUI: `prompt` (API graph: {node_id: {"class_type", "inputs"}}) and `workflow` (UI graph) JSON chunks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sdcli import __version__
from sdcli.runtime.errors import BadInputError, UsageError
from sdcli.formats.png_text import is_png, read_png_text

SDCLI_JSON_KEY = "sdcli"
PARAMETERS_KEY = "parameters"



def _names():
    """(sampler -> A1111 label, schedule -> A1111 label, schedule aliases): sampling/samplers.py's and schedule.py's
    tables (sampling/names.py, torch-free), the one place each name is kept."""
    from sdcli.sampling.names import SAMPLER_NAMES, SCHEDULE_ALIASES, SCHEDULE_LABELS

    return {spec.name: spec.a1111 for spec in SAMPLER_NAMES.values() if spec.a1111}, SCHEDULE_LABELS, SCHEDULE_ALIASES

# infotext label -> (our key, type); anything else lands in "extra" as text.
_FIELDS = [
    ("Steps", "steps", int), ("Sampler", "sampler", str), ("Schedule type", "schedule", str),
    ("CFG scale", "cfg_scale", float), ("Seed", "seed", int), ("Size", "size", str),
    ("Model hash", "model_hash", str), ("Model", "model", str), ("VAE hash", "vae_hash", str),
    ("VAE", "vae", str), ("Denoising strength", "denoising_strength", float), ("Clip skip", "clip_skip", int),
    ("RNG", "rng", str), ("Version", "version", str),
    # A1111's noise and sampler parameters (sampling/a1111_params.py INFOTEXT_FIELDS says when each is written)
    ("Variation seed", "subseed", int), ("Variation seed strength", "subseed_strength", float),
    ("Seed resize from", "seed_resize_from", str), ("ENSD", "ensd", int), ("Eta", "eta", float),
    ("Eta DDIM", "eta_ddim", float), ("Sigma churn", "s_churn", float), ("Sigma tmin", "s_tmin", float),
    ("Sigma tmax", "s_tmax", float), ("Sigma noise", "s_noise", float),
]
_LABEL_TO_KEY = {label: (key, typ) for label, key, typ in _FIELDS}

# One `Key: value` pair of the last infotext line; a value is either JSON-quoted or runs to the next comma.
# Same grammar as A1111's re_param (modules/infotext_utils.py), written out here.
_PAIR_RE = re.compile(r'\s*([\w][\w \-/+()]*?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def sanitize_value(value: Any) -> str:
    """Text for one infotext value: ',', ':' and line breaks become spaces, since parsers split on them."""
    text = re.sub(r"[,:\r\n]+", " ", str(value))
    return " ".join(text.split())


def _num(value: Any) -> str:
    """7.0 -> '7', 7.5 -> '7.5'; ints and strings unchanged."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def canonical_sampler(name: str) -> str:
    """Any known spelling (A1111 label, ComfyUI, sd.cpp, diffusers, ours) -> our canonical name; unknown names
    (samplers sdcli does not implement) unchanged."""
    from sdcli.sampling.names import resolve_sampler

    try:
        return resolve_sampler(name)[0]
    except UsageError:
        return name.strip()


def canonical_schedule(name: str) -> str | None:
    """Any known schedule spelling -> canonical name; 'Automatic' -> None (the sampler's default)."""
    _, labels, aliases = _names()
    low = name.strip().lower()
    if low in labels:
        return low
    by_label = {label.lower(): key for key, label in labels.items() if key != "ddim_uniform"}
    if low in by_label:
        return by_label[low]
    if low in aliases:
        return aliases[low]
    return name.strip()


def _pairs(p: dict) -> list[tuple[str, Any]]:
    """The A1111 `Key: value` pairs in A1111's order, skipping absent values."""
    sampler_labels, schedule_labels, _ = _names()
    sampler, schedule = p.get("sampler"), p.get("schedule")
    size = f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else p.get("size")
    clip_skip = p.get("clip_skip")
    pairs = [
        ("Steps", p.get("steps")),
        ("Sampler", sampler_labels.get(sampler, sampler) if sampler else None),
        ("Schedule type", schedule_labels.get(schedule, schedule) if schedule else None),
        ("CFG scale", p.get("cfg_scale", p.get("cfg"))), ("Seed", p.get("seed")), ("Size", size),
        ("Model hash", p.get("model_hash")), ("Model", p.get("model")),
        ("VAE hash", p.get("vae_hash")), ("VAE", p.get("vae")),
        ("Variation seed", p.get("subseed")), ("Variation seed strength", p.get("subseed_strength")),
        ("Seed resize from", p.get("seed_resize_from")),
        ("Denoising strength", p.get("denoising_strength")),
        # A1111 writes Clip skip only when it is not the default (1 = last layer).
        ("Clip skip", clip_skip if clip_skip not in (None, 0, 1) else None),
        # sdcli's default noise is A1111's CPU scheme (torch's CPU generator); without the field A1111 assumes GPU
        # noise, so it is written always.
        ("RNG", p.get("rng", "CPU")),
        *(p.get("sampler_fields") or {}).items(),  # Eta, Sigma churn, ..., ENSD where A1111 writes them
    ]
    pairs += list((p.get("extra") or {}).items())
    pairs.append(("Version", p.get("version") or f"sdcli {__version__}"))
    return [(k, v) for k, v in pairs if v is not None and v != ""]


# Values A1111 writes JSON-quoted because they hold ',' and ':' themselves ('Lora hashes: "name: 1a2b3c4d5e6f"').
QUOTED_LABELS = ("Lora hashes", "TI hashes", "Skip layers")


def _value(label: str, value: Any) -> str:
    if label in QUOTED_LABELS or label.startswith("ControlNet "):  # sd-webui-controlnet quotes its units
        return json.dumps(" ".join(str(value).split()), ensure_ascii=False)  # one line; quotes escaped
    return sanitize_value(_num(value))


def format_infotext(p: dict) -> str:
    """A1111 `parameters` text from a dict with keys prompt, negative_prompt, steps, sampler, schedule,
    cfg_scale, seed, width, height (or size "WxH"), model_hash, model, [vae, vae_hash, subseed, subseed_strength,
    seed_resize_from, denoising_strength, clip_skip, rng, sampler_fields ({label: value}), extra, version].

    Prompts keep their text (A1111 does too); every value on the last line is sanitised."""
    lines = [str(p.get("prompt") or "")]
    negative = p.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    pairs = ", ".join(f"{sanitize_value(k)}: {_value(k, v)}" for k, v in _pairs(p))
    lines.append(pairs)
    return "\n".join(lines)


def _parse_pairs(line: str) -> dict[str, str]:
    """`Key: value, Key: "quoted, value"` -> {Key: value}; unquotes A1111's JSON-quoted values."""
    out = {}
    for key, value in _PAIR_RE.findall(line):
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = value[1:-1]
        out[key.strip()] = str(value)
    return out


def _split_sampler(out: dict) -> None:
    """Old A1111 ('DPM++ 2M Karras') and sd.cpp ('euler_a karras') put the schedule inside the sampler value."""
    raw = out["sampler"]
    head, _, tail = raw.strip().rpartition(" ")
    _, labels, aliases = _names()
    known = {*labels, *(v.lower() for v in labels.values()), *aliases, "gits",
             "smoothstep"}
    if head and "schedule" not in out and tail.lower() in known:
        out["schedule"], raw = canonical_schedule(tail), head
    out["sampler"] = canonical_sampler(raw)


def _typed(out: dict, pairs: dict[str, str]) -> None:
    """Fill `out` with typed known fields; unknown or unparsable ones go to out['extra'] as text."""
    extra = {}
    for label, raw in pairs.items():
        key, typ = _LABEL_TO_KEY.get(label, (None, str))
        try:
            value = _integer(raw) if typ is int else typ(raw)
        except ValueError:
            key = None
        if key is None:
            extra[label] = raw
        else:
            out[key] = value
    if extra:
        out["extra"] = extra


def _integer(raw: str) -> int | float:
    """'20' or '20.0' -> 20. A value that is no integer ('inf', '1e400', '7.5') stays a float, for the caller to
    refuse with a range or type error (int('inf') would raise OverflowError); ValueError for text."""
    try:
        return int(raw)
    except ValueError:
        value = float(raw)  # ValueError for text; '1e400' and a 5000-digit number are inf
    return int(value) if value.is_integer() else value


def parse_infotext(text: str) -> dict:
    """Inverse of format_infotext, tolerant of A1111 / sd.cpp files from the wild.

    Returns prompt, negative_prompt and whichever of steps, sampler (canonical name when known), schedule,
    cfg_scale, seed, width, height (or size "WxH"), model_hash, model, ... were present; unknown pairs under 'extra'."""
    lines = text.replace("\r\n", "\n").strip("\n").split("\n")
    pairs = _parse_pairs(lines[-1]) if lines else {}
    if len(pairs) >= 3:  # the same test A1111 uses to tell a parameter line from a prompt line
        lines = lines[:-1]
    else:
        pairs = {}
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    _typed(out, pairs)
    if "schedule" in out:
        out["schedule"] = canonical_schedule(out["schedule"])
    if "sampler" in out:
        _split_sampler(out)
    size = _SIZE_RE.match(out.pop("size", "") or "")
    if size:
        out["width"], out["height"] = int(size.group(1)), int(size.group(2))
    return out


# --- ComfyUI ---------------------------------------------------------------------------------------------

_COMFY_SAMPLERS = ("KSampler", "KSamplerAdvanced")


MAX_COMFY_HOPS = 256  # nodes visited per lookup: real graphs are a few dozen nodes deep


def _inputs(node: Any) -> dict:
    """A node's inputs, or {} for anything that is not a well-formed node."""
    inputs = node.get("inputs") if isinstance(node, dict) else None
    return inputs if isinstance(inputs, dict) else {}


def _comfy_follow(graph: dict, link: Any, want: str) -> Any:
    """Follow a ComfyUI link ([node_id, slot]) upstream until a node has input `want`; None if never.

    Depth-first like the graph's wiring (pass-through nodes such as LoRA loaders carry the value on an input of
    the same kind), but iterative, with a visited set and a bounded number of hops: a node linked to itself, a
    cycle or a hostile graph ends the walk instead of hanging or recursing into a crash."""
    stack, seen = [link], set()
    while stack and len(seen) < MAX_COMFY_HOPS:
        link = stack.pop()
        if not (isinstance(link, list) and link and isinstance(link[0], (str, int))) or isinstance(link[0], bool):
            continue
        node_id = str(link[0])
        if node_id in seen:
            continue
        seen.add(node_id)
        inputs = _inputs(graph.get(node_id))
        if want in inputs and not isinstance(inputs[want], list):
            return inputs[want]
        keys = ("model", "conditioning", "conditioning_1", "samples", "latent_image", want)
        stack.extend(inputs[k] for k in reversed(keys) if isinstance(inputs.get(k), list))  # first key first
    return None


def summarize_comfyui(prompt_graph: dict) -> dict:
    """Seed/steps/cfg/sampler/scheduler of the first KSampler, its prompt texts, checkpoint and size."""
    nodes = [n for n in prompt_graph.values() if isinstance(n, dict)]
    ks = next((n for n in nodes if n.get("class_type") in _COMFY_SAMPLERS), None)
    if ks is None:
        return {}
    inp = _inputs(ks)
    out: dict[str, Any] = {}
    for src, dst in (("seed", "seed"), ("noise_seed", "seed"), ("steps", "steps"), ("cfg", "cfg_scale"),
                     ("denoise", "denoising_strength")):
        if isinstance(inp.get(src), (int, float)) and not isinstance(inp.get(src), bool):
            out[dst] = inp[src]
    if isinstance(inp.get("sampler_name"), str):
        out["sampler"] = canonical_sampler(inp["sampler_name"])
    if isinstance(inp.get("scheduler"), str):
        out["schedule"] = canonical_schedule(inp["scheduler"])
    for src, dst in (("positive", "prompt"), ("negative", "negative_prompt")):
        text = _comfy_follow(prompt_graph, inp.get(src), "text")
        if isinstance(text, str):
            out[dst] = text
    model = _comfy_follow(prompt_graph, inp.get("model"), "ckpt_name")
    if isinstance(model, str):
        out["model"] = model
    width = _comfy_follow(prompt_graph, inp.get("latent_image"), "width")
    height = _comfy_follow(prompt_graph, inp.get("latent_image"), "height")
    if isinstance(width, int) and isinstance(height, int) and not isinstance(width, bool):
        out["width"], out["height"] = width, height
    return out


def _summarize_comfy_workflow(workflow: dict) -> dict:
    """Only the UI graph: KSampler widgets are [seed, control, steps, cfg, sampler, scheduler, denoise]."""
    out: dict[str, Any] = {}
    nodes = workflow.get("nodes")
    for node in nodes if isinstance(nodes, list) else []:
        if not isinstance(node, dict):
            continue
        values = node.get("widgets_values")
        if node.get("type") == "KSampler" and isinstance(values, list) and len(values) >= 6 and "seed" not in out:
            out.update(seed=values[0], steps=values[2], cfg_scale=values[3],
                       sampler=canonical_sampler(str(values[4])), schedule=canonical_schedule(str(values[5])))
        elif node.get("type") == "CLIPTextEncode" and isinstance(values, list) and values:
            out.setdefault("texts", []).append(values[0])
    return out


# --- reading files -------------------------------------------------------------------------------------------


def _exif_user_comment(exif_of) -> str | None:
    """A1111 JPEG/WebP: EXIF UserComment (0x9286 in the Exif IFD), 8-byte charset prefix then the text.
    `exif_of()` gives PIL's Exif object; it is called inside the guard, so a malformed block is skipped."""
    try:
        raw = exif_of().get_ifd(0x8769).get(0x9286)
    except Exception:  # a malformed EXIF block is not worth failing an inspect over
        return None
    if isinstance(raw, str):
        return raw or None
    if not isinstance(raw, bytes) or len(raw) <= 8:
        return None
    prefix, body = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        # piexif (used by A1111) writes UTF-16 big-endian; some tools write little-endian: pick the readable one.
        be, le = body.decode("utf-16-be", "replace"), body.decode("utf-16-le", "replace")
        return be if sum(c.isascii() for c in be) >= sum(c.isascii() for c in le) else le
    return body.decode("utf-8", "replace").rstrip("\0")


SDCLI_EXIF_MARK = b"sdcli-json\0"  # sdcli's JSON in a JPEG/WebP: the Exif MakerNote, after this mark


def _exif_sdcli_json(exif_of) -> str | None:
    """sdcli's JSON in a JPEG/WebP it wrote: the Exif MakerNote after the mark (output/targets.image_bytes)."""
    try:
        raw = exif_of().get_ifd(0x8769).get(0x927C)
    except Exception:  # as _exif_user_comment: a malformed EXIF block is skipped
        return None
    if isinstance(raw, bytes) and raw.startswith(SDCLI_EXIF_MARK):
        return raw[len(SDCLI_EXIF_MARK):].decode("utf-8", "replace")
    return None


def _text_chunks(path: Path) -> dict[str, str]:
    """All text metadata of an image file (PNG tEXt/zTXt/iTXt, JPEG/WebP EXIF UserComment)."""
    from PIL import Image, UnidentifiedImageError  # pillow only when a file is actually read

    if not path.exists():
        raise BadInputError(f"{path}: no such file")
    if path.is_dir():
        raise BadInputError(f"{path}: is a directory, not an image")
    try:
        if _png_head(path):  # PIL's .text and getexif() decode every pixel first: a bomb on the metadata path
            texts, exif_block = read_png_text(path)
            comment = _exif_user_comment(lambda: _exif_from(exif_block)) if exif_block else None
        else:
            with Image.open(path) as img:
                texts = {key: value for key, value in img.info.items() if isinstance(value, str)}
                comment = _exif_user_comment(img.getexif)
                ours = _exif_sdcli_json(img.getexif)
                if ours is not None:
                    texts.setdefault(SDCLI_JSON_KEY, ours)
    except UnidentifiedImageError as exc:
        raise BadInputError(f"{path}: not an image file") from exc
    except Image.DecompressionBombError as exc:  # raised by Image.open for a huge declared size
        raise BadInputError(f"{path}: over the pixel limit (a decompression bomb?)") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise BadInputError(f"{path}: cannot read image metadata ({exc})") from exc
    if comment and PARAMETERS_KEY not in texts:
        texts[PARAMETERS_KEY] = comment
    return texts


def _exif_from(block: bytes):
    from PIL import Image

    exif = Image.Exif()
    exif.load(block)
    return exif


def _png_head(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return is_png(f.read(8))
    except OSError as exc:
        raise BadInputError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def _load_json(text: str | None) -> Any:
    """A JSON text chunk, or None when it is not usable JSON (malformed, nested past Python's recursion limit,
    or an integer past its digit limit): metadata we cannot read is metadata we do not have."""
    try:
        return json.loads(text) if text else None
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        return None


def read_image_metadata(path: str | Path) -> dict:
    """{"source": "sdcli"|"a1111"|"comfyui"|"sd.cpp"|None, "parameters": {...}, "raw": {chunk: text}}.

    `parameters` always uses parse_infotext's keys (prompt, steps, sampler, ...) whatever the source;
    for sdcli files the full JSON metadata is added under the key "sdcli"."""
    raw = _text_chunks(Path(path))
    result: dict[str, Any] = {"source": None, "parameters": {}, "raw": raw}
    infotext = raw.get(PARAMETERS_KEY)
    ours = _load_json(raw.get(SDCLI_JSON_KEY))
    if isinstance(ours, dict):
        result.update(source="sdcli", sdcli=ours)
        result["parameters"] = parse_infotext(infotext) if infotext else {}
    elif infotext:
        params = parse_infotext(infotext)
        is_sdcpp = str(params.get("version", "")).startswith("stable-diffusion.cpp")
        result.update(source="sd.cpp" if is_sdcpp else "a1111", parameters=params)
    else:
        graph, workflow = _load_json(raw.get("prompt")), _load_json(raw.get("workflow"))
        if isinstance(graph, dict):
            result.update(source="comfyui", parameters=summarize_comfyui(graph))
        elif isinstance(workflow, dict):
            result.update(source="comfyui", parameters=_summarize_comfy_workflow(workflow))
    return result


# --- the live preview's mark -------------------------------------------------------------------------------------

PREVIEW_KEY = "sdcli-preview"  # a PNG text chunk: this file is a --preview scratch file, replaced on every run


def is_preview_file(path: str | Path) -> bool:
    """Whether `path` is a PNG sdcli wrote as a live preview (so a rerun may replace it without --overwrite)."""
    try:
        texts, _ = read_png_text(path)
    except (OSError, BadInputError):
        return False
    return PREVIEW_KEY in texts

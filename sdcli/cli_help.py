"""How the commands' help reads: the option panels (declared here, once: which panel each option is shown in), the
examples at the end of each command's help, the defaults a config supplies, and what shell completion offers.

cli.py declares the options; `dress(app)` gives every command registered on the app the `HelpfulCommand` class,
which places each option in its panel (panel order, then declaration order inside a panel) and shows the examples.
An option not listed in PANELS lands in ADVANCED, so a new option is never lost from the help.
Nothing here imports torch: `sdcli generate -h` must stay instant (tests/test_cli_basics.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from typer.core import TyperCommand, TyperOption

# --- the panels, in the order the help shows them ------------------------------------------------------------------
MODEL = "Model"
INPUT = "Input"
PROMPT = "Prompt"
SAMPLING = "Sampling"
NOISE = "Seed and noise"
SIZE = "Size and count"
HIRES = "Hires fix"
INPAINT = "Inpaint and outpaint"
CONTROLNET = "ControlNet"
SDXL = "SDXL"
AXES = "Axes"
COMMAND = "Command"  # the options only one command has (upscale's tiles, serve's address, convert's types, ...)
OUTPUT = "Output"
DEVICE = "Device and speed"
CLUSTER = "Cluster and server"
ADVANCED = "Advanced"

PANELS: dict[str, tuple[str, ...]] = {  # panel -> the options (Python parameter names) shown in it
    MODEL: ("model", "config", "vae", "clip_l", "clip_g", "t5", "lora", "lora_dir", "embeddings_dir", "prediction",
            "upscaler", "upscaler_dir", "models_dir"),
    INPUT: ("image", "strength", "prompts_file", "from_image", "cond", "latent_in", "text"),
    PROMPT: ("negative", "clip_skip"),
    SAMPLING: ("steps", "cfg", "sampler", "schedule", "sigmas", "guidance_rescale", "guidance", "flow_shift",
               "slg_scale", "skip_layers", "slg_start", "slg_end"),
    NOISE: ("seed", "rng", "subseed", "subseed_strength", "seed_resize_from", "ensd", "eta", "s_churn", "s_tmin",
            "s_tmax", "s_noise"),
    SIZE: ("width", "height", "n", "batch_size", "seamless"),
    HIRES: ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler", "tome_ratio_hr"),
    INPAINT: ("mask", "mask_blur", "inpaint_fill", "inpaint_area", "inpaint_padding", "mask_invert", "overlay", "pad"),
    CONTROLNET: ("controlnet", "control_image", "control_weight", "control_start", "control_end", "guess_mode",
                 "control_resize", "control_preprocess"),
    SDXL: ("original_size", "target_size", "crop_coords", "aesthetic_score", "negative_aesthetic_score", "refiner",
           "refiner_switch"),
    AXES: ("x", "y", "z"),
    COMMAND: ("scale", "tile", "tile_overlap", "host", "port", "api_auth", "insecure", "max_request_mb", "quantize",
              "type_rules", "convs", "low", "high", "blur", "level", "invert_first", "factor", "min_psnr", "prompt",
              "listing", "kind", "hashes"),
    OUTPUT: ("output", "overwrite", "skip_existing", "json_out", "quiet", "verbose", "progress", "preview", "preview_vae",
             "preview_interval", "quality", "grid", "grid_rows", "grid_only", "latent_out", "keep_cells", "json_path",
             "report", "report_dir", "dry_run", "print_config"),
    DEVICE: ("device", "dtype", "threads", "offload", "vae_tiling", "vae_tile_size", "tome_ratio"),
    CLUSTER: ("server", "ray", "workers", "gpus_per_worker", "cpus_per_worker"),
}
# Where one command shows an option elsewhere than PANELS says (the same name meaning that command's own thing).
COMMAND_PANELS: dict[str, dict[str, str]] = {
    "preprocess": {"seed": COMMAND, "mask": COMMAND},
    "verify": {"image": INPUT, "mask": INPUT},
}
HELP = "Help"  # -h / --help, last
ORDER = (*PANELS, ADVANCED, HELP)
_PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}

# --- the examples at the end of each command's help (two or three; every one runs as written, given the files) ----
EXAMPLES: dict[str, tuple[str, ...]] = {
    "generate": (
        'sdcli generate "a lighthouse at dusk" -m sd15.safetensors --steps 25 --seed 7 -o out.png',
        'sdcli generate "a cat" -m sd15.safetensors -n 4 --sampler "DPM++ 2M Karras" -o "cats/{index}-{seed}.png"',
        'sdcli generate "a castle" -m sd15.safetensors --seed 7 --dry-run   # the plan: seeds, sigmas, tokens',
    ),
    "img2img": (
        'sdcli img2img "a watercolor" -i photo.jpg -m sd15.safetensors --strength 0.6 -o painted.png',
        'sdcli img2img "a red door" -i house.png --mask mask.png -m sd15.safetensors -o door.png',
        'sdcli img2img "more sky" -i house.png --pad 0,128,0,0 -m sd15.safetensors -o taller.png',
    ),
    "sweep": (
        'sdcli sweep "a cat" -m sd15.safetensors --x cfg=3,7,11 --y sampler=euler,dpm++_2m -o plot.png',
        'sdcli sweep "a cat" -m sd15.safetensors --x seed=1-4 --z steps=10,20 -o plot.png --json',
    ),
    "encode": (
        "sdcli encode photo.png -m sd15.safetensors -o photo.latent",
        'sdcli encode --text "a cat" -m sd15.safetensors -o cat.emb.safetensors',
    ),
    "decode": (
        "sdcli decode photo.latent -m sd15.safetensors -o roundtrip.png",
        "sdcli decode photo.latent --vae taesd_decoder.safetensors -o quick.png",
    ),
    "inspect": (
        "sdcli inspect sd15.safetensors out.png   # a model's family, sizes, hashes; an image's settings",
        'sdcli inspect --prompt "a (red:1.3) car BREAK night"   # weights, tokens, chunks',
        "sdcli inspect --list --kind loras --json   # the LoRAs in the configured folders",
    ),
    "upscale": (
        "sdcli upscale photo.png -u 4x-UltraSharp.pth -o photo-4x.png",
        "sdcli upscale a.png b.png -u Lanczos --scale 2 -o '{stem}-2x.png'",
    ),
    "preprocess": (
        "sdcli preprocess canny photo.png -o edges.png",
        "sdcli preprocess scribble sketch.png -o hint.png --invert-first",
    ),
    "convert": (
        "sdcli convert old.ckpt -o old.safetensors",
        "sdcli convert sd15.safetensors -o sd15-q8_0.gguf --quantize q8_0",
    ),
    "verify": (
        "sdcli verify smoke.png -m sd15.safetensors",
        "sdcli verify ci/*.png -m sd15.safetensors --report report.html",
    ),
    "serve": (
        "sdcli serve -m sd15.safetensors",
        'sdcli generate "a cat" --server http://127.0.0.1:7860 -o cat.png   # rendered by the warm server',
    ),
}


def examples(command: str) -> str | None:
    """The epilog of `command`'s help: its examples, one per line."""
    lines = EXAMPLES.get(command)
    return "\n".join(["Examples:", *lines]) if lines else None


def panel_of(command: str, name: str) -> str:
    return COMMAND_PANELS.get(command, {}).get(name) or _PANEL_OF.get(name, ADVANCED)


class HelpfulCommand(TyperCommand):
    """A Typer command whose options sit in their panels (in ORDER), with its examples as the epilog and the
    defaults a config supplies shown next to the options that default to 'not given'."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.epilog is None:
            self.epilog = examples(self.name or "")
        for param in self.params:
            if isinstance(param, TyperOption) and not getattr(param, "rich_help_panel", None):
                param.rich_help_panel = panel_of(self.name or "", param.name or "")
        options = [p for p in self.params if isinstance(p, TyperOption)]
        options.sort(key=lambda p: ORDER.index(p.rich_help_panel) if p.rich_help_panel in ORDER else len(ORDER))
        self.params = [p for p in self.params if not isinstance(p, TyperOption)] + options

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.rich_help_panel = HELP
        return option

    def format_help(self, ctx, formatter) -> None:
        _show_config_defaults(self.params)
        return super().format_help(ctx, formatter)


def _show_config_defaults(params) -> None:
    """Options that default to None take their value from the config (RunConfig's default unless a config file
    says otherwise): show that default, as `[default: 20]`."""
    from dataclasses import MISSING, fields

    from sdcli.config import RunConfig

    defaults = {f.name: f.default for f in fields(RunConfig) if f.default is not MISSING}
    for param in params:
        if not isinstance(param, TyperOption) or param.default is not None or param.name not in defaults:
            continue
        value = defaults[param.name]
        if value in (None, "", ()):  # the model's or the family's: the option's help says which
            continue
        shown = ("on" if value else "off") if isinstance(value, bool) else str(value)
        param.show_default = shown
        param._get_default_string = lambda shown=shown, **_: shown  # as a value, not Click's "(text)" of a string


def dress(app) -> None:
    """Give every command registered on `app` the HelpfulCommand class (call once, after the last command)."""
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):  # Typer's default class: the commands did not choose one
            info.cls = HelpfulCommand


# --- shell completion ------------------------------------------------------------------------------------------------
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CONFIG_SUFFIXES = (".yaml", ".yml")
LATENT_SUFFIXES = (".latent", ".safetensors")


def complete_sampler(incomplete: str) -> list[str]:
    """sdcli's sampler names and ComfyUI's (none has a space a shell would split) that start with what was typed;
    A1111's labels work as values too ('DPM++ 2M Karras', quoted) but are not offered."""
    from sdcli.sampling.names import SAMPLER_NAMES

    return _starting([w for spec in SAMPLER_NAMES.values() for w in (spec.name, spec.comfy) if w] + ["help"],
                     incomplete)


def complete_schedule(incomplete: str) -> list[str]:
    from sdcli.sampling.names import SCHEDULE_NAMES

    return _starting(["auto", *SCHEDULE_NAMES, "help"], incomplete)


def _starting(words: list[str], incomplete: str) -> list[str]:
    """The words that start with what was typed, once each, in order."""
    return list(dict.fromkeys(w for w in words if w.startswith(incomplete.lower())))


def complete_files(incomplete: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """File and folder names that start with what was typed (for an option that names a file) (folders end in '/'; hidden ones only when the name
    typed starts with '.'); with `suffixes`, only files with those extensions (any case) and folders."""
    cut = incomplete.rfind("/") + 1
    prefix, stem = incomplete[:cut], incomplete[cut:]
    folder = Path(os.path.expanduser(prefix or "."))
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError:
        return []
    out = []
    for entry in entries:
        if not entry.name.startswith(stem) or (entry.name.startswith(".") and not stem.startswith(".")):
            continue
        if _is_dir(entry):
            out.append(f"{prefix}{entry.name}/")
        elif not suffixes or entry.name.lower().endswith(suffixes):
            out.append(prefix + entry.name)
    return out


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def complete_model(incomplete: str) -> list[str]:
    return complete_files(incomplete, MODEL_SUFFIXES)


def complete_image(incomplete: str) -> list[str]:
    return complete_files(incomplete, IMAGE_SUFFIXES)


def complete_config(incomplete: str) -> list[str]:
    return complete_files(incomplete, CONFIG_SUFFIXES)


def complete_latent(incomplete: str) -> list[str]:
    return complete_files(incomplete, LATENT_SUFFIXES)


def complete_any_file(incomplete: str) -> list[str]:
    return complete_files(incomplete)


def complete_folder(incomplete: str) -> list[str]:
    return [name for name in complete_files(incomplete) if name.endswith("/")]

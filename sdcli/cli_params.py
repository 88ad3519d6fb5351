"""The options the commands share (generate, img2img and sweep most of them; encode, decode, upscale and verify a
few), taken by name, and what a command does with them: the config keys given, the request fields every render
takes, the ControlNet flags.

Typer reads a command's options from its signature, so each rendering command used to spell out some sixty
parameters and then name them all again to build its config flags. Here a command declares only its own parameters
and lists the shared options it takes (`@takes(...)`); they reach it in `**given`, under their parameter names.

The help shows options panel by panel (cli_help.HelpfulCommand), in the order they are listed inside a panel, so a
command's list reads panel by panel in the order its help shows them.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Optional

from sdcli import cli_options as opt

# Each shared option: its parameter name -> its Typer annotation (cli_options), and the default when it is not given.
# None: not given, so the config (or the command's default) decides.
OPTIONS: dict[str, Any] = dict(
    config=opt.ConfigOpt, model=opt.ModelOpt, vae=opt.VaeOpt, clip_l=opt.ClipLOpt, clip_g=opt.ClipGOpt, t5=opt.T5Opt,
    lora_dir=opt.LoraDirOpt, embeddings_dir=opt.EmbeddingsDirOpt, prediction=opt.PredictionOpt,
    upscaler_dir=opt.UpscalerDirOpt, lora=opt.LoraOpt,
    negative=opt.NegativeOpt, clip_skip=opt.ClipSkipOpt,
    steps=opt.StepsOpt, cfg=opt.CfgOpt, guidance_rescale=opt.RescaleOpt, sampler=opt.SamplerOpt,
    schedule=opt.ScheduleOpt, sigmas=opt.SigmasOpt, guidance=opt.GuidanceOpt, flow_shift=opt.FlowShiftOpt,
    slg_scale=opt.SlgScaleOpt, skip_layers=opt.SkipLayersOpt, slg_start=opt.SlgStartOpt, slg_end=opt.SlgEndOpt,
    seed=opt.SeedOpt, rng=opt.RngOpt, subseed=opt.SubseedOpt, subseed_strength=opt.SubseedStrengthOpt,
    seed_resize_from=opt.SeedResizeOpt, ensd=opt.EnsdOpt, eta=opt.EtaOpt, s_churn=opt.SChurnOpt, s_tmin=opt.STminOpt,
    s_tmax=opt.STmaxOpt, s_noise=opt.SNoiseOpt,
    width=opt.WidthOpt, height=opt.HeightOpt, n=opt.CountOpt, batch_size=opt.BatchOpt, seamless=opt.SeamlessOpt,
    hires_scale=opt.HiresScaleOpt, hires_strength=opt.HiresStrengthOpt, hires_steps=opt.HiresStepsOpt,
    hires_upscaler=opt.HiresUpscalerOpt, tome_ratio_hr=opt.TomeHrOpt,
    mask_blur=opt.MaskBlurOpt, inpaint_fill=opt.InpaintFillOpt, inpaint_area=opt.InpaintAreaOpt,
    inpaint_padding=opt.InpaintPaddingOpt, mask_invert=opt.MaskInvertOpt, overlay=opt.OverlayOpt, pad=opt.PadOpt,
    controlnet=opt.ControlNetOpt, control_image=opt.ControlImageOpt, control_weight=opt.ControlWeightOpt,
    control_start=opt.ControlStartOpt, control_end=opt.ControlEndOpt, guess_mode=opt.GuessModeOpt,
    control_resize=opt.ControlResizeOpt, control_preprocess=opt.ControlPreprocessOpt,
    original_size=opt.OriginalSizeOpt, target_size=opt.TargetSizeOpt, crop_coords=opt.CropOpt,
    aesthetic_score=opt.AestheticOpt, negative_aesthetic_score=opt.NegAestheticOpt, refiner=opt.RefinerOpt,
    refiner_switch=opt.RefinerSwitchOpt,
    output=opt.OutputOpt, verbose=opt.VerboseOpt, latent_out=opt.LatentOutOpt, grid=opt.GridOpt,
    grid_rows=opt.GridRowsOpt, grid_only=opt.GridOnlyOpt, overwrite=opt.OverwriteOpt, quiet=opt.QuietOpt,
    json_out=opt.JsonOpt, progress=opt.ProgressOpt, preview=opt.PreviewOpt, preview_vae=opt.PreviewVaeOpt,
    preview_interval=opt.PreviewIntervalOpt, quality=opt.QualityOpt, skip_existing=opt.SkipExistingOpt,
    print_config=opt.PrintConfigOpt, dry_run=opt.DryRunOpt,
    dtype=opt.DtypeOpt, device=opt.DeviceOpt, threads=opt.ThreadsOpt, vae_tiling=opt.VaeTilingOpt,
    vae_tile_size=opt.VaeTileSizeOpt, tome_ratio=opt.TomeOpt, offload=opt.OffloadOpt,
    ray=opt.RayOpt, workers=opt.WorkersOpt, gpus_per_worker=opt.GpusPerWorkerOpt,
    cpus_per_worker=opt.CpusPerWorkerOpt, server=opt.ServerOpt,
)
DEFAULTS: dict[str, Any] = {  # the options that are not None when not given
    "verbose": False, "grid_rows": -1, "grid_only": False, "overwrite": False, "quiet": False, "json_out": False,
    "progress": "auto", "preview_interval": 0.5, "skip_existing": False, "print_config": False, "dry_run": False,
    "mask_invert": False, "guess_mode": False, "cpus_per_worker": 1.0,
}

# Runs of options that several commands list together, each inside one panel.
MODEL = ("config", "model", "vae", "clip_l", "clip_g", "t5", "lora_dir")
PROMPT = ("negative", "clip_skip")
SAMPLING = ("steps", "cfg", "guidance_rescale", "sampler", "schedule")
FLOW = ("guidance", "flow_shift", "slg_scale", "skip_layers", "slg_start", "slg_end")  # SD3 / FLUX sampling
NOISE = ("seed", "rng", "subseed", "subseed_strength", "seed_resize_from", "ensd", "eta", "s_churn", "s_tmin",
         "s_tmax", "s_noise")
COUNT = ("n", "batch_size")
HIRES = ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler", "tome_ratio_hr")
INPAINT = ("mask_blur", "inpaint_fill", "inpaint_area", "inpaint_padding", "mask_invert", "overlay", "pad")
CONTROLNET = ("controlnet", "control_image", "control_weight", "control_start", "control_end", "guess_mode",
              "control_resize", "control_preprocess")
SDXL = ("original_size", "target_size", "crop_coords", "aesthetic_score", "negative_aesthetic_score")
REFINER = ("refiner", "refiner_switch")
GRID = ("grid", "grid_rows", "grid_only")
OUTPUT = ("overwrite", "quiet", "json_out", "progress", "preview", "preview_vae", "preview_interval", "quality",
          "skip_existing", "print_config", "dry_run")
DEVICE = ("dtype", "device", "threads")
VAE_TILING = ("vae_tiling", "vae_tile_size")
CLUSTER = ("ray", "workers", "gpus_per_worker", "cpus_per_worker", "server")


def takes(*names: str) -> Callable:
    """Decorator: the command also takes the shared options `names`, after its own parameters (Typer reads the
    signature made here; the command gets them in **given)."""

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.kind is not inspect.Parameter.VAR_KEYWORD]
        shared = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=OPTIONS[name],
                                    default=DEFAULTS.get(name)) for name in names]
        command.__signature__ = inspect.Signature([*own, *shared])
        return command

    return decorate


def config_flags(given: dict[str, Any], **own: Any) -> dict[str, Any]:
    """Config key -> value of the options given (the shared ones in `given`, the command's own in `own`), in the
    config's key order. None is not given; an off switch (--mask-invert) is not given either, so a config's value
    stands."""
    from sdcli.config import FIELDS

    values = {**given, **own}
    return {key: values[key] for key in FIELDS if key in values and values[key] is not None
            and not (values[key] is False and DEFAULTS.get(key) is False)}


def render_request(given: dict[str, Any]) -> dict[str, Any]:
    """The fields generate's and img2img's requests share, from the options given."""
    return dict(config_file=given["config"], overwrite=given["overwrite"], json_out=given["json_out"],
                progress=progress_mode(given["progress"]), loras=list(given["lora"] or []), preview=given["preview"],
                preview_vae=given["preview_vae"], preview_interval=given["preview_interval"],
                quality=given["quality"], grid=given["grid"], grid_rows=given["grid_rows"],
                grid_only=given["grid_only"], skip_existing=given["skip_existing"], server=given["server"],
                dry_run=given["dry_run"], workers=workers(given))


def control(given: dict[str, Any]) -> dict:
    """The ControlNet flags as given (lists), for control_config.from_flags / replayed."""
    def listed(name: str) -> list:
        return list(given[name] or [])

    return dict(models=listed("controlnet"), images=listed("control_image"), weights=listed("control_weight"),
                starts=listed("control_start"), ends=listed("control_end"), guess=given["guess_mode"],
                resizes=listed("control_resize"), preprocesses=listed("control_preprocess"))


def with_controlnets(flags: dict, asked: dict) -> dict:
    """The config flags with the ControlNet units the flags `asked` (control()) make, when they make any."""
    from sdcli.control.settings import from_flags

    units = from_flags(**asked)
    return flags if units is None else {**flags, "controlnets": units}


def workers(given: dict[str, Any]):
    """The --ray replicas asked for (app/cluster.Workers)."""
    from sdcli.app.cluster import Workers

    return Workers(given["workers"], given["gpus_per_worker"], given["cpus_per_worker"])


def progress_mode(mode: str) -> str:
    if mode not in ("auto", "json", "none"):
        from sdcli.runtime.errors import UsageError

        raise UsageError(f"option --progress: must be auto, json or none, got {mode!r}")
    return mode


def print_config(flags: dict, config: Optional[Path], as_json: bool) -> None:
    """--print-config: the resolved config, each value with its source (YAML, or one JSON line)."""
    import typer

    from sdcli import config as cfgmod

    cfg, shown = cfgmod.resolve(flags, config), cfgmod.sources(flags, config)
    if as_json:
        from sdcli.runtime.console import emit_result

        emit_result("config", None, {"config": cfg.to_dict(), "sources": shown})
    else:
        typer.echo(cfgmod.to_yaml(cfg, shown), nl=False)

"""The `sdcli` command line: thin Typer commands over one library call each.

Heavy imports (torch, transformers, the pipeline) happen inside command bodies, so `sdcli --help` stays instant.
Every command runs inside `_handled`, the one place that turns known errors into a single stderr line and the
exit code documented in the README.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import INTERRUPTED_EXIT_CODE, OutOfMemoryError, SdcliError, Terminated

app = typer.Typer(
    name="sdcli",
    help="Stable Diffusion from the command line: generate, img2img, encode, decode, inspect.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _handled(fn):
    """Run a command body; map errors to one line on stderr and a documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from . import console

        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except SdcliError as e:
            if isinstance(e.__cause__, BrokenPipeError):
                _silence_stdout()
            console.error(str(e))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.error("interrupted; finished images were kept")
            raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
        except Terminated as e:
            try:  # after a hang-up the terminal may be gone
                console.error(f"terminated by {e}; finished images were kept")
            except OSError:
                pass
            raise typer.Exit(e.exit_code) from None
        except BrokenPipeError:
            _silence_stdout()
            raise typer.Exit(7) from None
        except Exception as e:  # noqa: BLE001 - the last line of defence
            if os.environ.get("SDCLI_DEBUG"):
                raise
            if _is_out_of_memory(e):
                console.error(f"{_OOM_ADVICE} ({_first_line(e)})")
                raise typer.Exit(OutOfMemoryError.exit_code) from None
            console.error(f"unexpected {type(e).__name__}: {e} (run with SDCLI_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


_OOM_ADVICE = ("out of memory: try a smaller -W/-H, a smaller --batch-size, --dtype fp16 or bf16, "
               "or --device cpu")


def _is_out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, XPU), or the RuntimeError the CPU and MPS allocators raise instead."""
    torch = sys.modules.get("torch")  # never import torch here: an OOM can only come from code that did
    if torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def _silence_stdout() -> None:
    """After a closed pipe, point stdout at /dev/null so Python's exit flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class _ClosedStdout:
    """Stands in for sys.stdout when the process was started with stdout closed (`>&-`): Python then sets it to
    None, and a write would be an AttributeError (exit 1) or, through click, silently nothing (exit 0)."""

    closed = False

    def write(self, _data) -> int:
        from .errors import OutputError

        raise OutputError("stdout is closed: nowhere to write the output (redirect it, or drop -o - / --json)")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def buffer(self):
        return self


def _stdout_needed(output: Optional[str], json_out: bool) -> None:
    """Data for stdout with stdout closed: refused before any work."""
    if isinstance(sys.stdout, _ClosedStdout) and (output == "-" or json_out):
        sys.stdout.write("")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sdcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
) -> None:
    """Stable Diffusion from the command line."""


# --- options shared by the rendering commands ----------------------------------------------------
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file (see configs/).")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint file, diffusers folder or hub id.")]
VaeOpt = Annotated[Optional[str], typer.Option("--vae", help="VAE file or folder overriding the checkpoint's; a TAESD "
                                               "file (taesd_decoder.safetensors) for fast decodes.")]
PredictionOpt = Annotated[Optional[str], typer.Option("--prediction", help="auto, eps or v (override detection).")]
OutputOpt = Annotated[
    Optional[str], typer.Option("--output", "-o", help="Output file, '-' for stdout, or a template with {index} {seed} {prompt}.")
]
NegativeOpt = Annotated[Optional[str], typer.Option("--negative", help="Negative prompt.")]
WidthOpt = Annotated[Optional[int], typer.Option("--width", "-W", help="Width in pixels (multiple of 8).")]
HeightOpt = Annotated[Optional[int], typer.Option("--height", "-H", help="Height in pixels (multiple of 8).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", "-s", help="Sampling steps.")]
CfgOpt = Annotated[Optional[float], typer.Option("--cfg", help="Classifier-free guidance scale (1 = off).")]
RescaleOpt = Annotated[Optional[float], typer.Option("--guidance-rescale", help="Guidance rescale phi (0..1).")]
SamplerOpt = Annotated[
    Optional[str], typer.Option("--sampler", help="Sampler name or alias ('DPM++ 2M Karras'); 'help' lists them.")
]
ScheduleOpt = Annotated[Optional[str], typer.Option("--schedule", help="Sigma schedule (karras, normal, ...).")]
SigmasOpt = Annotated[Optional[str], typer.Option("--sigmas", help="Custom comma-separated sigma list.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed; -1 or absent draws one (recorded).")]
CountOpt = Annotated[Optional[int], typer.Option("-n", "--images", help="Number of images.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Images per UNet batch.")]
ClipSkipOpt = Annotated[Optional[int], typer.Option("--clip-skip", help="Use the text encoder's k-th last layer.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto, fp32, bf16 or fp16.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per result on stdout.")]
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", help="Print the resolved config and exit.")]
LoraOpt = Annotated[
    Optional[list[str]], typer.Option("--lora", help="kohya/A1111 LoRA FILE.safetensors[:WEIGHT] (SD1.x; "
                                      "repeatable; weight 1 by default), merged before sampling.")
]
LoraDirOpt = Annotated[
    Optional[str], typer.Option("--lora-dir", help="Folder where <lora:NAME[:WEIGHT]> in a prompt finds NAME.safetensors "
                                "(sub-folders too).")
]
EmbeddingsDirOpt = Annotated[
    Optional[str], typer.Option("--embeddings-dir", help="Folder of textual-inversion embeddings (A1111's "
                                "embeddings/, sub-folders too): a file's name in the prompt, or embedding:NAME, "
                                "places its vectors.")
]
PreviewOpt = Annotated[
    Optional[str], typer.Option("--preview", help="Keep this PNG showing the image being sampled (a cheap "
                                "latent-to-RGB estimate, rewritten at most twice a second).")
]
ControlNetOpt = Annotated[
    Optional[list[str]], typer.Option("--controlnet", help="ControlNet FILE or diffusers folder (repeatable: one "
                                      "unit each; needs --control-image).")
]
ControlImageOpt = Annotated[
    Optional[list[str]], typer.Option("--control-image", help="The hint image of the n-th --controlnet (an edge, "
                                      "depth, pose... map; resized to the output).")
]
ControlWeightOpt = Annotated[
    Optional[list[float]], typer.Option("--control-weight", help="ControlNet weight (once: every unit; else the "
                                        "n-th unit's). Default 1.")
]
ControlStartOpt = Annotated[
    Optional[list[float]], typer.Option("--control-start", help="Fraction of the steps where the unit starts (0).")
]
ControlEndOpt = Annotated[
    Optional[list[float]], typer.Option("--control-end", help="Fraction of the steps where the unit ends (1).")
]
GuessModeOpt = Annotated[
    bool, typer.Option("--guess-mode", help="ControlNet guess mode for every unit (conditional half only, "
                       "shallow residuals scaled down).")
]
ControlResizeOpt = Annotated[
    Optional[list[str]], typer.Option("--control-resize", help="just (stretch, default), crop or fill.")
]
ControlPreprocessOpt = Annotated[
    Optional[list[str]], typer.Option("--control-preprocess", help="Turn the control image into a hint first: "
                                      "canny, invert, threshold, scribble, tile, shuffle.")
]


def _control(controlnet, control_image, control_weight, control_start, control_end, guess_mode, control_resize,
             control_preprocess) -> dict:  # fmt: skip
    """The ControlNet flags as given (lists), for control_config.from_flags / replayed."""
    return dict(models=list(controlnet or []), images=list(control_image or []), weights=list(control_weight or []),
                starts=list(control_start or []), ends=list(control_end or []), guess=guess_mode,
                resizes=list(control_resize or []), preprocesses=list(control_preprocess or []))  # fmt: skip


def _with_controlnets(flags: dict, control: dict) -> dict:
    from .control_config import from_flags

    units = from_flags(**control)
    return flags if units is None else {**flags, "controlnets": units}


PreviewVaeOpt = Annotated[
    Optional[str], typer.Option("--preview-vae", help="TAESD decoder (taesd_decoder.safetensors; taesdxl_ for SDXL) "
                                "that draws the --preview picture; by default the family's taesd file in vae_dir.")
]
SeamlessOpt = Annotated[
    Optional[bool], typer.Option("--seamless/--no-seamless", help="Tileable output (wraps at the edges).")
]
HiresScaleOpt = Annotated[
    Optional[float], typer.Option("--hires-scale", help="Hires fix: upscale the latents by this (1..4; 1 = off) "
                                  "and run a second img2img pass (A1111 'Hires. fix', Latent upscaler).")
]
HiresStrengthOpt = Annotated[
    Optional[float], typer.Option("--hires-strength", help="Hires fix: denoising strength of the second pass (0..1).")
]
HiresStepsOpt = Annotated[
    Optional[int], typer.Option("--hires-steps", help="Hires fix: steps of the second pass (default: --steps).")
]
GridOpt = Annotated[
    Optional[str], typer.Option("--grid", help="Also write a contact sheet of the run's images to this PNG "
                                "(the first image's metadata plus every seed).")
]
GridRowsOpt = Annotated[
    int, typer.Option("--grid-rows", help="Rows of the --grid sheet: -1 = about sqrt(n), 0 = one per batch "
                      "(A1111's rules).")
]
GridOnlyOpt = Annotated[bool, typer.Option("--grid-only", help="Write the --grid sheet only, not the single images.")]
# SDXL's conditioning and refiner (config keys of the same names)
OriginalSizeOpt = Annotated[Optional[str], typer.Option("--original-size", help="SDXL: the original size WxH it "
                                                         "conditions on (default: the output size).")]
TargetSizeOpt = Annotated[Optional[str], typer.Option("--target-size", help="SDXL: the target size WxH it "
                                                     "conditions on (default: the output size).")]
CropOpt = Annotated[Optional[str], typer.Option("--crop-coords", help="SDXL: crop TOP,LEFT it conditions on (0,0).")]
AestheticOpt = Annotated[Optional[float], typer.Option("--aesthetic-score", help="SDXL refiner: the prompt's "
                                                       "aesthetic score (6.0).")]
NegAestheticOpt = Annotated[Optional[float], typer.Option("--negative-aesthetic-score", help="SDXL refiner: the "
                                                          "negative prompt's aesthetic score (2.5).")]
RefinerOpt = Annotated[Optional[str], typer.Option("--refiner", help="SDXL refiner checkpoint: it takes over the "
                                                   "sampling at --refiner-switch.")]
RefinerSwitchOpt = Annotated[Optional[float], typer.Option("--refiner-switch", help="Fraction of the steps the "
                                                           "base model runs before the refiner (0.8).")]
ProgressOpt = Annotated[
    str, typer.Option("--progress", help="auto (a bar on a terminal), json (one event per step on stderr) or none.")
]

RayOpt = Annotated[
    Optional[str], typer.Option("--ray", help="Render on a Ray cluster: auto (RAY_ADDRESS or the running cluster), "
                                "local (start one on this machine) or ray://HOST:PORT. Needs sdcli[ray].")
]
WorkersOpt = Annotated[
    Optional[int], typer.Option("--workers", min=1, help="With --ray: model replicas (default: one per GPU, or "
                                "one per machine without GPUs).")
]
GpusPerWorkerOpt = Annotated[
    Optional[float], typer.Option("--gpus-per-worker", min=0, help="With --ray: GPUs per replica (default 1 "
                                  "when the cluster has GPUs, else 0).")
]
CpusPerWorkerOpt = Annotated[
    float, typer.Option("--cpus-per-worker", min=0.01, help="With --ray: CPUs per replica (its torch threads).")
]
SkipExistingOpt = Annotated[
    bool, typer.Option("--skip-existing", help="Render only the images missing: an existing output whose "
                       "metadata is this job's counts as done (resumes an interrupted batch).")
]


def _workers(workers, gpus_per_worker, cpus_per_worker):
    from .app.cluster import Workers

    return Workers(workers, gpus_per_worker, cpus_per_worker)


def _flags(**given) -> dict:
    """Config-key -> value for the options actually given (None = not given)."""
    return {k: v for k, v in given.items() if v is not None}


def _progress_mode(mode: str) -> str:
    if mode not in ("auto", "json", "none"):
        from .errors import UsageError

        raise UsageError(f"option --progress: must be auto, json or none, got {mode!r}")
    return mode


def _print_config(flags: dict, config: Optional[Path], as_json: bool) -> None:
    from . import config as cfgmod

    cfg = cfgmod.resolve(flags, config)
    if as_json:
        from .console import emit_json

        emit_json(cfg.to_dict())
    else:
        typer.echo(cfgmod.to_yaml(cfg), nl=False)


@app.command()
@_handled
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (A1111 weights like (word:1.2) work).")] = None,
    output: OutputOpt = None,
    negative: NegativeOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    guidance_rescale: RescaleOpt = None,
    sampler: SamplerOpt = None,
    schedule: ScheduleOpt = None,
    sigmas: SigmasOpt = None,
    seed: SeedOpt = None,
    n: CountOpt = None,
    batch_size: BatchOpt = None,
    clip_skip: ClipSkipOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    vae: VaeOpt = None,
    lora_dir: LoraDirOpt = None,
    embeddings_dir: EmbeddingsDirOpt = None,
    prediction: PredictionOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    prompts_file: Annotated[
        Optional[str], typer.Option("--prompts-file", help="One prompt per line, or JSONL jobs; '-' = stdin.")
    ] = None,
    from_image: Annotated[
        Optional[Path], typer.Option("--from-image", help="Replay the settings (and prompt) recorded in this image.")
    ] = None,
    cond: Annotated[Optional[Path], typer.Option("--cond", help="Embedding file from `sdcli encode --text`.")] = None,
    latent_in: Annotated[Optional[Path], typer.Option("--latent-in", help="Start from this latent file.")] = None,
    strength: Annotated[
        Optional[float], typer.Option("--strength", help="With --latent-in: fraction of the schedule re-run (0..1).")
    ] = None,
    seamless: SeamlessOpt = None,
    hires_scale: HiresScaleOpt = None,
    hires_strength: HiresStrengthOpt = None,
    hires_steps: HiresStepsOpt = None,
    latent_out: Annotated[Optional[str], typer.Option("--latent-out", help="Also save the final latent here.")] = None,
    grid: GridOpt = None,
    grid_rows: GridRowsOpt = -1,
    grid_only: GridOnlyOpt = False,
    original_size: OriginalSizeOpt = None,
    target_size: TargetSizeOpt = None,
    crop_coords: CropOpt = None,
    aesthetic_score: AestheticOpt = None,
    negative_aesthetic_score: NegAestheticOpt = None,
    refiner: RefinerOpt = None,
    refiner_switch: RefinerSwitchOpt = None,
    lora: LoraOpt = None,
    controlnet: ControlNetOpt = None,
    control_image: ControlImageOpt = None,
    control_weight: ControlWeightOpt = None,
    control_start: ControlStartOpt = None,
    control_end: ControlEndOpt = None,
    guess_mode: GuessModeOpt = False,
    control_resize: ControlResizeOpt = None,
    control_preprocess: ControlPreprocessOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    progress: ProgressOpt = "auto",
    preview: PreviewOpt = None,
    preview_vae: PreviewVaeOpt = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    cpus_per_worker: CpusPerWorkerOpt = 1.0,
    skip_existing: SkipExistingOpt = False,
    print_config: PrintConfigOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan (config, sigmas, tokens) and exit.")] = False,
) -> None:
    """Render images from a text prompt."""
    flags = _flags(output=output, negative=negative, width=width, height=height, steps=steps, cfg=cfg,
                   guidance_rescale=guidance_rescale, sampler=sampler, schedule=schedule, sigmas=sigmas, seed=seed,
                   n=n, batch_size=batch_size, clip_skip=clip_skip, model=model, vae=vae, lora_dir=lora_dir,
                   embeddings_dir=embeddings_dir,
                   prediction=prediction, dtype=dtype, device=device, strength=strength, seamless=seamless,
                   hires_scale=hires_scale, hires_strength=hires_strength, hires_steps=hires_steps, ray=ray,
                   original_size=original_size, target_size=target_size, crop_coords=crop_coords,
                   aesthetic_score=aesthetic_score, negative_aesthetic_score=negative_aesthetic_score,
                   refiner=refiner, refiner_switch=refiner_switch)
    control = _control(controlnet, control_image, control_weight, control_start, control_end, guess_mode,
                       control_resize, control_preprocess)
    if from_image is None:  # replayed units are resolved with the image's record (app/generate.py)
        flags = _with_controlnets(flags, control)
    _stdout_needed(output, json_out or print_config or dry_run)
    if print_config and from_image is None:
        return _print_config(flags, config, json_out)
    from .console import set_quiet
    from .app.generate import GenerateRequest, run_generate

    set_quiet(quiet)
    run_generate(GenerateRequest(
        prompt=prompt, flags=flags, config_file=config, prompts_file=prompts_file, cond=cond, latent_in=latent_in,
        latent_out=latent_out, overwrite=overwrite, json_out=json_out, dry_run=dry_run, from_image=from_image,
        print_config=print_config, progress=_progress_mode(progress), loras=list(lora or []), preview=preview,
        control=control,
        preview_vae=preview_vae,
        grid=grid, grid_rows=grid_rows, grid_only=grid_only,
        skip_existing=skip_existing, workers=_workers(workers, gpus_per_worker, cpus_per_worker),
    ))


@app.command()
@_handled
def img2img(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    image: Annotated[str, typer.Option("--image", "-i", help="Input image ('-' = stdin).")],
    strength: Annotated[Optional[float], typer.Option("--strength", help="0..1: fraction of the schedule re-run.")] = None,
    mask: Annotated[Optional[str], typer.Option("--mask", help="Inpaint: white = repaint, black = keep (needs a "
                                                "9-channel inpainting model; strength defaults to 1).")] = None,
    output: OutputOpt = None,
    negative: NegativeOpt = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    guidance_rescale: RescaleOpt = None,
    sampler: SamplerOpt = None,
    schedule: ScheduleOpt = None,
    seed: SeedOpt = None,
    n: CountOpt = None,
    batch_size: BatchOpt = None,
    clip_skip: ClipSkipOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    vae: VaeOpt = None,
    lora_dir: LoraDirOpt = None,
    embeddings_dir: EmbeddingsDirOpt = None,
    prediction: PredictionOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    original_size: OriginalSizeOpt = None,
    target_size: TargetSizeOpt = None,
    crop_coords: CropOpt = None,
    aesthetic_score: AestheticOpt = None,
    negative_aesthetic_score: NegAestheticOpt = None,
    lora: LoraOpt = None,
    controlnet: ControlNetOpt = None,
    control_image: ControlImageOpt = None,
    control_weight: ControlWeightOpt = None,
    control_start: ControlStartOpt = None,
    control_end: ControlEndOpt = None,
    guess_mode: GuessModeOpt = False,
    control_resize: ControlResizeOpt = None,
    control_preprocess: ControlPreprocessOpt = None,
    grid: GridOpt = None,
    grid_rows: GridRowsOpt = -1,
    grid_only: GridOnlyOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    progress: ProgressOpt = "auto",
    preview: PreviewOpt = None,
    preview_vae: PreviewVaeOpt = None,
    ray: RayOpt = None,
    workers: WorkersOpt = None,
    gpus_per_worker: GpusPerWorkerOpt = None,
    cpus_per_worker: CpusPerWorkerOpt = 1.0,
    skip_existing: SkipExistingOpt = False,
    print_config: PrintConfigOpt = False,
) -> None:
    """Re-render an image guided by a prompt (VAE-encode, noise to the strength, sample the rest)."""
    flags = _flags(strength=strength, output=output, negative=negative, steps=steps, cfg=cfg,
                   guidance_rescale=guidance_rescale, sampler=sampler, schedule=schedule, seed=seed, n=n,
                   batch_size=batch_size, clip_skip=clip_skip, model=model, vae=vae, lora_dir=lora_dir,
                   embeddings_dir=embeddings_dir,
                   prediction=prediction, dtype=dtype, device=device, ray=ray, original_size=original_size,
                   target_size=target_size, crop_coords=crop_coords, aesthetic_score=aesthetic_score,
                   negative_aesthetic_score=negative_aesthetic_score)
    flags = _with_controlnets(flags, _control(controlnet, control_image, control_weight, control_start, control_end,
                                              guess_mode, control_resize, control_preprocess))
    _stdout_needed(output, json_out or print_config)
    if print_config:
        return _print_config(flags, config, json_out)
    from .console import set_quiet
    from .app.img2img import Img2ImgRequest, run_img2img

    set_quiet(quiet)
    run_img2img(Img2ImgRequest(prompt=prompt, image=image, flags=flags, config_file=config, overwrite=overwrite,
                               json_out=json_out, progress=_progress_mode(progress), mask=mask,
                               loras=list(lora or []), preview=preview, preview_vae=preview_vae, grid=grid, grid_rows=grid_rows,
                               grid_only=grid_only, skip_existing=skip_existing,
                               workers=_workers(workers, gpus_per_worker, cpus_per_worker)))


@app.command()
@_handled
def sweep(
    prompt: Annotated[str, typer.Argument(help="The prompt every cell starts from.")],
    x: Annotated[str, typer.Option("--x", help="Columns: KEY=V1,V2,... (a config key, prompt_sr or lora:NAME; "
                                   "ranges like seed=1-8, cfg=3-11 (+2), steps=10-40 [4]).")],
    output: Annotated[str, typer.Option("--output", "-o", help="The plot PNG (several --z values: STEM-zK.png); "
                                        "the cells' JSON goes beside it as STEM.json.")],
    y: Annotated[Optional[str], typer.Option("--y", help="Rows: KEY=V1,V2,...")] = None,
    z: Annotated[Optional[str], typer.Option("--z", help="One plot per value: KEY=V1,V2,...")] = None,
    keep_cells: Annotated[
        Optional[str], typer.Option("--keep-cells", help="Also keep each cell's PNG (full metadata) in this folder.")
    ] = None,
    json_path: Annotated[
        Optional[str], typer.Option("--json-out", help="Write the cells' JSON here instead of beside the plot.")
    ] = None,
    negative: NegativeOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    guidance_rescale: RescaleOpt = None,
    sampler: SamplerOpt = None,
    schedule: ScheduleOpt = None,
    sigmas: SigmasOpt = None,
    seed: SeedOpt = None,
    clip_skip: ClipSkipOpt = None,
    seamless: SeamlessOpt = None,
    hires_scale: HiresScaleOpt = None,
    hires_strength: HiresStrengthOpt = None,
    hires_steps: HiresStepsOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    vae: VaeOpt = None,
    lora_dir: LoraDirOpt = None,
    prediction: PredictionOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    lora: LoraOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    progress: ProgressOpt = "auto",
) -> None:
    """X/Y/Z plot: render the prompt over axes of settings, one labelled plot per --z value (model loaded once)."""
    from .console import set_quiet
    from .app.sweep import SweepRequest, run_sweep

    set_quiet(quiet)
    flags = _flags(negative=negative, width=width, height=height, steps=steps, cfg=cfg,
                   guidance_rescale=guidance_rescale, sampler=sampler, schedule=schedule, sigmas=sigmas, seed=seed,
                   clip_skip=clip_skip, seamless=seamless, hires_scale=hires_scale, hires_strength=hires_strength,
                   hires_steps=hires_steps, model=model, vae=vae, lora_dir=lora_dir, prediction=prediction,
                   dtype=dtype, device=device)
    run_sweep(SweepRequest(prompt=prompt, x=x, y=y, z=z, output=output, flags=flags, config_file=config,
                           loras=list(lora or []), keep_cells=keep_cells, json_path=json_path, overwrite=overwrite,
                           progress=_progress_mode(progress)))


@app.command()
@_handled
def encode(
    image: Annotated[Optional[str], typer.Argument(help="Image to encode into a VAE latent ('-' = stdin).")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Latent (.safetensors or ComfyUI .latent) or embedding file.")] = "",
    text: Annotated[Optional[str], typer.Option("--text", help="Encode this prompt with CLIP instead of an image.")] = None,
    clip_skip: ClipSkipOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    vae: VaeOpt = None,
    lora_dir: LoraDirOpt = None,
    embeddings_dir: EmbeddingsDirOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run one stage forward: an image -> a VAE latent file, or --text -> a CLIP embedding file."""
    from .console import set_quiet
    from .app.encode import EncodeRequest, run_encode

    set_quiet(quiet)
    flags = _flags(clip_skip=clip_skip, model=model, vae=vae, lora_dir=lora_dir, embeddings_dir=embeddings_dir,
                   dtype=dtype, device=device)
    run_encode(EncodeRequest(image=image, text=text, output=output, flags=flags, config_file=config,
                             overwrite=overwrite, json_out=json_out))


@app.command()
@_handled
def decode(
    latent: Annotated[Path, typer.Argument(help="Latent file (ours or ComfyUI .latent).")],
    output: OutputOpt = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    vae: VaeOpt = None,
    dtype: DtypeOpt = None,
    device: DeviceOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the VAE decoder: a latent file -> PNG."""
    from .console import set_quiet
    from .app.encode import DecodeRequest, run_decode

    set_quiet(quiet)
    flags = _flags(output=output, model=model, vae=vae, dtype=dtype, device=device)
    _stdout_needed(output, json_out)
    run_decode(DecodeRequest(latent=latent, flags=flags, config_file=config, overwrite=overwrite, json_out=json_out))


@app.command()
@_handled
def inspect(
    path: Annotated[Optional[Path], typer.Argument(help="Checkpoint, image, latent or embedding file.")] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Show how this prompt is tokenized.")] = None,
    hashes: Annotated[bool, typer.Option("--hash/--no-hash", help="Hash checkpoints (reads the whole file).")] = True,
    embeddings_dir: EmbeddingsDirOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Explain an artifact: checkpoint, image metadata, latent/embedding file, or a prompt's tokens."""
    from .inspecting import run_inspect

    run_inspect(path=path, prompt=prompt, hashes=hashes, json_out=json_out, embeddings_dir=embeddings_dir)


@app.command()
@_handled
def preprocess(
    kind: Annotated[str, typer.Argument(help="canny, invert, threshold, scribble, tile, shuffle or inpaint.")],
    image: Annotated[str, typer.Argument(help="The picture to turn into a ControlNet hint.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The hint PNG to write.")],
    low: Annotated[float, typer.Option("--low", help="canny: low threshold (cv2.Canny's scale).")] = 100.0,
    high: Annotated[float, typer.Option("--high", help="canny: high threshold.")] = 200.0,
    blur: Annotated[float, typer.Option("--blur", help="canny, tile: Gaussian blur sigma in pixels first.")] = 0.0,
    level: Annotated[int, typer.Option("--level", help="threshold/scribble/inpaint: gray >= level is white.")] = 128,
    invert_first: Annotated[bool, typer.Option("--invert-first", help="threshold: dark strokes on a light page.")] = False,
    factor: Annotated[float, typer.Option("--factor", help="tile: downscale factor.")] = 8.0,
    seed: Annotated[int, typer.Option("--seed", help="shuffle: the warp's seed.")] = 0,
    mask: Annotated[Optional[str], typer.Option("--mask", help="inpaint: white = the hole.")] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Make a ControlNet hint from a picture (preprocessors that need no model)."""
    from .app.preprocess import PreprocessRequest, run_preprocess
    from .console import set_quiet

    set_quiet(quiet)
    run_preprocess(PreprocessRequest(kind, image, output, low, high, blur, level, invert_first, factor, seed, mask,
                                     overwrite))  # fmt: skip


@app.command()
@_handled
def convert(
    source: Annotated[Path, typer.Argument(help="A pickle checkpoint (.ckpt / .pt) to convert.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .safetensors file to write.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert a .ckpt to .safetensors through the restricted loader (no code in the file can run)."""
    from .app.convert import run_convert

    run_convert(source, output, overwrite)


@app.command()
@_handled
def verify(
    images: Annotated[list[Path], typer.Argument(help="PNGs written by sdcli (their metadata holds the whole recipe).")],
    model: ModelOpt = None,
    vae: VaeOpt = None,
    lora_dir: LoraDirOpt = None,
    embeddings_dir: EmbeddingsDirOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    min_psnr: Annotated[float, typer.Option("--min-psnr", help="Pass when the re-render is at least this close (dB).")] = 40.0,
    lora: LoraOpt = None,
    refiner: RefinerOpt = None,
    controlnet: ControlNetOpt = None,
    control_image: ControlImageOpt = None,
    report: Annotated[
        Optional[str], typer.Option("--report", help="Write one self-contained HTML page: each stored image, its "
                                    "re-render, a difference heat map, the numbers; failures first.")
    ] = None,
    report_dir: Annotated[
        Optional[str], typer.Option("--report-dir", help="Like --report, as DIR/index.html with the PNGs beside it.")
    ] = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Re-render images from their recorded settings and compare (PSNR, max difference); exit 9 if any drifted."""
    from .console import set_quiet
    from .app.verify import run_verify

    if min_psnr != min_psnr:  # NaN: every comparison with it is false, so nothing could pass or fail honestly
        from .errors import UsageError

        raise UsageError("option --min-psnr: must be a number of dB (inf: identical), got nan")
    set_quiet(quiet)
    flags = _flags(model=model, vae=vae, lora_dir=lora_dir, embeddings_dir=embeddings_dir, device=device,
                   refiner=refiner)
    run_verify(images, flags, config, min_psnr, json_out, list(lora or []), report, report_dir, overwrite,
               {"models": list(controlnet or []), "images": list(control_image or [])})


def _on_signal(signum, _frame) -> None:
    """SIGTERM / SIGHUP: raise Terminated where the program is, so it unwinds like Ctrl-C. A second signal
    while it unwinds is ignored: the run is already ending, and its cleanup must not be cut short."""
    for sig in _TERMINATING:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))  # no SIGHUP on Windows


def main() -> None:
    """Console-script entry point."""
    _utf8_everywhere()
    if sys.stdout is None:
        sys.stdout = _ClosedStdout()
    for sig in _TERMINATING:
        if signal.getsignal(sig) is signal.SIG_DFL:  # `nohup` sets SIGHUP to ignored: keep it so
            signal.signal(sig, _on_signal)
    try:
        app()
    except SdcliError as e:  # outside a command (`--help` with stdout closed): the same one line
        from . import console

        console.error(str(e))
        sys.exit(e.exit_code)


def _utf8_everywhere() -> None:
    """In an ASCII locale with Python's UTF-8 mode turned off (LC_ALL=C PYTHONUTF8=0), arguments arrive as
    surrogate escapes: a prompt 'ü' would reach the tokenizer as two lone surrogates and could not be written to
    a PNG. Run again in UTF-8 mode, with the same argument bytes, so prompts and file names mean what they say."""
    import os
    import sys

    if sys.flags.utf8_mode or sys.getfilesystemencoding().lower() not in ("ascii", "ansi_x3.4-1968"):
        return
    if os.environ.get("PYTHONUTF8") == "1":  # already tried: never loop
        return
    os.environ["PYTHONUTF8"] = "1"
    os.execv(sys.executable, [sys.executable, "-X", "utf8", "-m", "sdcli", *sys.argv[1:]])


if __name__ == "__main__":
    main()

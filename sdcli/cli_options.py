"""The options the commands share, declared once (Typer reads each command's signature, so each command lists the
ones it takes: `model: opt.ModelOpt = None`). Kept apart from cli.py so the commands stay readable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from sdcli import cli_help

# Short flags the peers use for different things, so sdcli has none of them: a habit carried over would silently
# change the result (`-s 42`: 42 steps here, seed 42 in stable-diffusion.cpp; `-b 4`: four images in A1111 and
# stable-diffusion.cpp, one image per UNet batch here). Given, they are refused with what to write instead.
PEER_FLAGS = {
    "-s": "sdcli has no -s: write --steps N for sampling steps or --seed N for the seed "
          "(stable-diffusion.cpp's -s is the seed)",
    "-b": "sdcli has no -b: write -n N for how many images, --batch-size N for how many share one UNet batch "
          "(A1111's batch size and stable-diffusion.cpp's -b both make that many images)",
}


def peer_flag(args: list[str]) -> str | None:
    """The hint for the first peer short flag among the command-line `args` (`-s`, `-s42`), else None."""
    for arg in args:
        if arg == "--":
            return None
        for flag, hint in PEER_FLAGS.items():
            if arg == flag or (arg.startswith(flag) and arg[2:].lstrip("-").isdigit()):
                return hint
    return None


def _name_table(table: str):
    """An eager callback: `--sampler help` / `--schedule help` print their table and exit before anything else is
    checked (no PROMPT, no model, img2img's required --image); any other value passes through."""

    def callback(value: Optional[str]) -> Optional[str]:
        if value is not None and value.strip().lower() == "help":
            from sdcli.sampling import names

            typer.echo(getattr(names, table)())
            raise typer.Exit()
        return value

    return callback


ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config file, or a preset shipped "
                                                    "with sdcli by name (default, fast, lcm, quality, sd21-768-v, "
                                                    "sdxl-turbo).", autocompletion=cli_help.complete_config)]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint file, diffusers folder or hub id.",
                                autocompletion=cli_help.complete_model)]
VaeOpt = Annotated[Optional[str], typer.Option("--vae", help="VAE file or folder overriding the checkpoint's; a TAESD "
                                               "file (taesd_decoder.safetensors) for fast decodes.",
                                autocompletion=cli_help.complete_model)]
PredictionOpt = Annotated[Optional[str], typer.Option("--prediction", help="auto, eps or v (override detection).")]
ClipLOpt = Annotated[Optional[str], typer.Option("--clip-l", help="SD3 / FLUX: the CLIP-L text encoder as a file of "
                                                 "its own (ComfyUI's clip_l.safetensors).",
                                autocompletion=cli_help.complete_model)]
ClipGOpt = Annotated[Optional[str], typer.Option("--clip-g", help="SD3: the CLIP-G (bigG) text encoder as a file "
                                                 "of its own (clip_g.safetensors).",
                                autocompletion=cli_help.complete_model)]
T5Opt = Annotated[Optional[str], typer.Option("--t5", help="SD3 / FLUX: the T5-XXL text encoder as a file of its "
                                              "own (t5xxl_fp16.safetensors; fp8 files are up-cast).",
                                autocompletion=cli_help.complete_model)]
GuidanceOpt = Annotated[Optional[float], typer.Option("--guidance", help="FLUX dev: the distilled guidance "
                                                      "strength (3.5); --cfg above 1 adds true CFG on top.")]
FlowShiftOpt = Annotated[Optional[float], typer.Option("--flow-shift", help="SD3 / FLUX: a constant time shift "
                                                       "replacing the family's (SD3 3.0; FLUX dev's resolution "
                                                       "rule; schnell 1.0).")]
SlgScaleOpt = Annotated[Optional[float], typer.Option("--slg-scale", help="SD3.5: skip-layer guidance strength "
                                                      "(0 = off; 2.5 suits SD3.5 Medium).")]
SkipLayersOpt = Annotated[Optional[str], typer.Option("--skip-layers", help="SD3.5: the joint blocks skip-layer "
                                                      "guidance skips (default 7,8,9).")]
SlgStartOpt = Annotated[Optional[float], typer.Option("--slg-start", help="SD3.5: skip-layer guidance from this "
                                                      "fraction of the steps (0.01).")]
SlgEndOpt = Annotated[Optional[float], typer.Option("--slg-end", help="SD3.5: ... until this fraction (0.2).")]
OutputOpt = Annotated[
    Optional[str], typer.Option("--output", "-o", help="Output file, '-' for stdout, or a template with {index} {seed} {prompt}.",
                                autocompletion=cli_help.complete_any_file)
]
NegativeOpt = Annotated[Optional[str], typer.Option("--negative", help="Negative prompt.")]
WidthOpt = Annotated[Optional[int], typer.Option("--width", "-W", help="Width in pixels (multiple of 8).")]
HeightOpt = Annotated[Optional[int], typer.Option("--height", "-H", help="Height in pixels (multiple of 8).")]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", help="Sampling steps.")]
CfgOpt = Annotated[Optional[float], typer.Option("--cfg", help="Classifier-free guidance scale (1 = off; default "
                                                "7, FLUX 1).")]
RescaleOpt = Annotated[Optional[float], typer.Option("--guidance-rescale", help="Guidance rescale phi (0..1).")]
SamplerOpt = Annotated[
    Optional[str], typer.Option("--sampler", help="Sampler name or alias ('DPM++ 2M Karras'); 'help' lists them.",
                                is_eager=True, callback=_name_table("sampler_help"),
                                autocompletion=cli_help.complete_sampler)
]
ScheduleOpt = Annotated[Optional[str], typer.Option("--schedule", help="Sigma schedule (karras, normal, ...); "
                                                    "'help' lists them.", is_eager=True,
                                                    callback=_name_table("schedule_help"),
                                                    autocompletion=cli_help.complete_schedule)]
SigmasOpt = Annotated[Optional[str], typer.Option("--sigmas", help="Custom comma-separated sigma list.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed; -1 or absent draws one (recorded).")]
# A1111's noise and sampler parameters (config keys of the same names; README "Noise")
RngOpt = Annotated[Optional[str], typer.Option("--rng", help="Noise source: cpu (default; torch's CPU generator), "
                                               "gpu or nv (A1111's GPU / NV Philox noise, the same on any device).")]
SubseedOpt = Annotated[Optional[int], typer.Option("--subseed", help="Variation seed (A1111); -1 draws one. Image k "
                                                   "of a batch gets subseed+k.")]
SubseedStrengthOpt = Annotated[Optional[float], typer.Option("--subseed-strength", help="Variation strength 0..1: "
                                                             "how far the noise moves towards the variation seed's.")]
SeedResizeOpt = Annotated[Optional[str], typer.Option("--seed-resize-from", help="WxH: draw the seed's noise at this "
                                                      "size and paste it centred (A1111 'Resize seed from').")]
EnsdOpt = Annotated[Optional[int], typer.Option("--ensd", help="Eta noise seed delta (A1111): the sampler's noise "
                                                "comes from seed + ENSD after the initial noise.")]
EtaOpt = Annotated[Optional[float], typer.Option("--eta", help="Eta of the ancestral / SDE samplers (default 1) or "
                                                 "of DDIM (default 0).")]
SChurnOpt = Annotated[Optional[float], typer.Option("--s-churn", help="Euler / Heun / DPM2: sigma churn (0).")]
STminOpt = Annotated[Optional[float], typer.Option("--s-tmin", help="Euler / Heun / DPM2: churn from this sigma (0).")]
STmaxOpt = Annotated[Optional[float], typer.Option("--s-tmax", help="Euler / Heun / DPM2: churn up to this sigma "
                                                   "(0 = no limit).")]
SNoiseOpt = Annotated[Optional[float], typer.Option("--s-noise", help="Euler / Heun / DPM2: churn noise scale (1).")]
CountOpt = Annotated[Optional[int], typer.Option("-n", "--images", help="Number of images.")]
BatchOpt = Annotated[Optional[int], typer.Option("--batch-size", help="Images per UNet batch (-n is how many).")]
ClipSkipOpt = Annotated[Optional[int], typer.Option("--clip-skip", help="Use the text encoder's k-th last layer.")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="auto, fp32, bf16 or fp16.")]
DeviceOpt = Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or mps.")]
VaeTilingOpt = Annotated[Optional[str], typer.Option("--vae-tiling", help="Decode the image in tiles: auto (only "
                                                    "when a whole decode runs out of memory), on or off.")]
VaeTileSizeOpt = Annotated[Optional[int], typer.Option("--vae-tile-size", help="Side of a --vae-tiling tile in "
                                                       "pixels (multiple of 8; 512).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Print how long each stage took (text encode, "
                                          "each sampling pass, VAE decode, save) on stderr.")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", min=1, max=1024, help="CPU threads torch uses "
                                                   "(default: one per core); the image's bytes do not depend on it.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or messages on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per result on stdout.")]
PrintConfigOpt = Annotated[bool, typer.Option("--print-config", help="Print the resolved config, each value "
                                                                      "with its source, and exit.")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show the plan and exit, nothing loaded or written: the "
                                         "files it would write, size, seeds, sigmas, prompt schedule, tokens "
                                         "(--json: one JSON line per job).")]
LoraOpt = Annotated[
    Optional[list[str]], typer.Option("--lora", help="kohya/A1111 LoRA FILE.safetensors[:WEIGHT] (SD1.x; "
                                      "repeatable; weight 1 by default), merged before sampling.",
                                autocompletion=cli_help.complete_model)
]
LoraDirOpt = Annotated[
    Optional[str], typer.Option("--lora-dir", help="Folder where <lora:NAME[:WEIGHT]> in a prompt finds NAME.safetensors "
                                "(sub-folders too).",
                                autocompletion=cli_help.complete_folder)
]
EmbeddingsDirOpt = Annotated[
    Optional[str], typer.Option("--embeddings-dir", help="Folder of textual-inversion embeddings (A1111's "
                                "embeddings/, sub-folders too): a file's name in the prompt, or embedding:NAME, "
                                "places its vectors.",
                                autocompletion=cli_help.complete_folder)
]
PreviewOpt = Annotated[
    Optional[str], typer.Option("--preview", help="Keep this PNG showing the image being sampled (a cheap "
                                "latent-to-RGB estimate, rewritten at most twice a second).",
                                autocompletion=cli_help.complete_any_file)
]
QualityOpt = Annotated[
    Optional[int], typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality, 1-100 (-o x.jpg, x.webp; "
                                "default 90; WebP 100 is lossless).")
]
PreviewIntervalOpt = Annotated[
    float, typer.Option("--preview-interval", help="Seconds between --preview rewrites (the last step is always "
                        "written; 0: every step).")
]
ControlNetOpt = Annotated[
    Optional[list[str]], typer.Option("--controlnet", help="ControlNet FILE or diffusers folder (repeatable: one "
                                      "unit each; needs --control-image).",
                                autocompletion=cli_help.complete_model)
]
ControlImageOpt = Annotated[
    Optional[list[str]], typer.Option("--control-image", help="The hint image of the n-th --controlnet (an edge, "
                                      "depth, pose... map; resized to the output).",
                                autocompletion=cli_help.complete_image)
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
PreviewVaeOpt = Annotated[
    Optional[str], typer.Option("--preview-vae", help="TAESD decoder (taesd_decoder.safetensors; taesdxl_ for SDXL) "
                                "that draws the --preview picture; by default the family's taesd file in vae_dir.",
                                autocompletion=cli_help.complete_model)
]
OffloadOpt = Annotated[
    Optional[bool], typer.Option("--offload/--no-offload", help="Low memory: one of text encoders, UNet, VAE in "
                                 "memory at a time on a CPU (on a GPU only while it runs); slower. See README.")
]
SeamlessOpt = Annotated[
    Optional[bool], typer.Option("--seamless/--no-seamless", help="Tileable output (wraps at the edges).")
]
HiresScaleOpt = Annotated[
    Optional[float], typer.Option("--hires-scale", help="Hires fix: upscale the first pass by this (1..4; 1 = off) "
                                  "and run a second img2img pass (A1111 'Hires. fix'; --hires-upscaler says how).")
]
HiresStrengthOpt = Annotated[
    Optional[float], typer.Option("--hires-strength", help="Hires fix: denoising strength of the second pass (0..1).")
]
TomeOpt = Annotated[
    Optional[float], typer.Option("--tome-ratio", help="Token merging (ToMe, as A1111): merge this fraction of "
                                  "the full-resolution self-attention tokens (0 off, up to 0.9); faster, lossy.")
]
TomeHrOpt = Annotated[
    Optional[float], typer.Option("--tome-ratio-hr", help="Token merging of the hires fix pass (default: --tome-ratio).")
]
HiresStepsOpt = Annotated[
    Optional[int], typer.Option("--hires-steps", help="Hires fix: steps of the second pass (default: --steps).")
]
HiresUpscalerOpt = Annotated[
    Optional[str], typer.Option("--hires-upscaler", help="Hires fix: how pass 1 is enlarged: Latent (default), "
                                "Latent (antialiased|bicubic|bicubic antialiased|nearest|nearest-exact), Lanczos, "
                                "Nearest, None, or an upscaler model: a file, or a name in --upscaler-dir.",
                                autocompletion=cli_help.complete_model)
]
UpscalerDirOpt = Annotated[
    Optional[str], typer.Option("--upscaler-dir", help="Folder where upscaler models are found by name (A1111's "
                                "models/ layout: ESRGAN/, RealESRGAN/, ... and sub-folders).",
                                autocompletion=cli_help.complete_folder)
]
GridOpt = Annotated[
    Optional[str], typer.Option("--grid", help="Also write a contact sheet of the run's images to this PNG "
                                "(the first image's metadata plus every seed).",
                                autocompletion=cli_help.complete_any_file)
]
GridRowsOpt = Annotated[
    int, typer.Option("--grid-rows", help="Rows of the --grid sheet: -1 = about sqrt(n), 0 = one per batch "
                      "(A1111's rules).")
]
GridOnlyOpt = Annotated[bool, typer.Option("--grid-only", help="Write the --grid sheet only, not the single images.")]
LatentOutOpt = Annotated[Optional[str], typer.Option("--latent-out", help="Also save the final latent here.")]
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
                                                   "sampling at --refiner-switch.",
                                autocompletion=cli_help.complete_model)]
RefinerSwitchOpt = Annotated[Optional[float], typer.Option("--refiner-switch", help="Fraction of the steps the "
                                                           "base model runs before the refiner (0.8).")]
ProgressOpt = Annotated[
    str, typer.Option("--progress", help="auto (a bar on a terminal), json (one event per step on stderr) or none.")
]
RayOpt = Annotated[
    Optional[str], typer.Option("--ray", help="Render on a Ray cluster: auto (RAY_ADDRESS or the running cluster), "
                                "local (start one on this machine) or ray://HOST:PORT. Needs the ray extra (make install-ray).")
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
# Inpainting and outpainting (img2img --mask / --pad; app/inpaint.py), A1111's img2img inpaint settings
MaskBlurOpt = Annotated[Optional[int], typer.Option("--mask-blur", help="Blur the mask by this Gaussian radius in "
                                                    "pixels (A1111 'Mask blur'; default 4, 0 with a 9-channel "
                                                    "inpainting model).")]
InpaintFillOpt = Annotated[Optional[str], typer.Option("--inpaint-fill", help="What the masked area starts from "
                                                       "(A1111 'Masked content'): original (default), fill, "
                                                       "latent-noise or latent-nothing.")]
InpaintAreaOpt = Annotated[Optional[str], typer.Option("--inpaint-area", help="whole (default) or masked: render "
                                                       "only the mask's region, scaled up to the image size, and "
                                                       "paste it back (A1111 'Only masked').")]
InpaintPaddingOpt = Annotated[Optional[int], typer.Option("--inpaint-padding", help="--inpaint-area masked: pixels "
                                                          "around the mask's region (32).")]
MaskInvertOpt = Annotated[bool, typer.Option("--mask-invert", help="Repaint the black area, keep the white "
                                             "(A1111 'Inpaint not masked').")]
OverlayOpt = Annotated[Optional[bool], typer.Option("--overlay/--no-overlay", help="Put the original back outside "
                                                    "the blurred mask (default on; off with a 9-channel model).")]
PadOpt = Annotated[Optional[str], typer.Option("--pad", help="Outpaint: grow the canvas by LEFT,TOP,RIGHT,BOTTOM "
                                               "pixels (edge colours repeated) and paint the new border.")]
ServerOpt = Annotated[
    Optional[str], typer.Option("--server", envvar="SDCLI_SERVER", help="Render in a warm `sdcli serve` at this URL "
                                "(http://HOST:PORT; user:pass@ for --api-auth); the files are written here.")
]

"""The `sdcli` command line: thin Typer commands over one library call each.

Heavy imports (torch, transformers, the pipeline) happen inside command bodies, so `sdcli --help` stays instant.
Every command runs inside `cli_guard.handled`, the one place that turns known errors into a single stderr line and the
exit code documented in the README.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sdcli import __version__
from sdcli import cli_guard as guard
from sdcli import cli_help
from sdcli import cli_options as opt
from sdcli import cli_params as params
from sdcli.runtime.errors import SdcliError, UsageError

app = typer.Typer(
    name="sdcli",
    help="Stable Diffusion from the command line: generate, img2img, encode, decode, inspect.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",  # the option panels (cli_help.py); help texts hold no rich markup
    cls=guard.OneLineGroup,  # a bad option is one error line, exit 2
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


def _flags(**given) -> dict:
    """Config-key -> value for the options actually given (None = not given)."""
    return {k: v for k, v in given.items() if v is not None}


# --- the commands: their own parameters, then the shared options they take (cli_params.py), panel by panel
@app.command()
@guard.handled
@params.takes(
    *params.MODEL, "embeddings_dir", "prediction", "upscaler_dir", "lora",
    *params.PROMPT, *params.SAMPLING, "sigmas", *params.FLOW, *params.NOISE, "width", "height", *params.COUNT,
    "seamless", *params.HIRES, *params.CONTROLNET, *params.SDXL, *params.REFINER,
    "output", "verbose", "latent_out", *params.GRID, *params.OUTPUT,
    *params.DEVICE, *params.VAE_TILING, "tome_ratio", "offload", *params.CLUSTER,
)
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt (A1111 weights like (word:1.2) work).")] = None,
    prompts_file: Annotated[
        Optional[str], typer.Option("--prompts-file", help="One prompt per line, or JSONL jobs; '-' = stdin.",
                                    autocompletion=cli_help.complete_any_file)
    ] = None,
    from_image: Annotated[
        Optional[Path], typer.Option("--from-image", help="Replay the settings (and prompt) recorded in this image.",
                                     autocompletion=cli_help.complete_image)
    ] = None,
    cond: Annotated[Optional[Path], typer.Option("--cond", help="Embedding file from `sdcli encode --text`.",
                                                 autocompletion=cli_help.complete_latent)] = None,
    latent_in: Annotated[Optional[Path], typer.Option("--latent-in", help="Start from this latent file.",
                                                      autocompletion=cli_help.complete_latent)] = None,
    strength: Annotated[
        Optional[float], typer.Option("--strength", help="With --latent-in: fraction of the schedule re-run (0..1).")
    ] = None,
    **given,
) -> None:
    """Render images from a text prompt."""
    flags = params.config_flags(given, strength=strength)
    control = params.control(given)
    if from_image is None:  # replayed units are resolved with the image's record (app/generate.py)
        flags = params.with_controlnets(flags, control)
    guard.stdout_needed(given["output"], given["json_out"] or given["print_config"] or given["dry_run"])
    if given["print_config"] and from_image is None:
        return params.print_config(flags, given["config"], given["json_out"])
    from sdcli.runtime.console import set_quiet, set_verbose
    from sdcli.app.generate import GenerateRequest, run_generate

    set_quiet(given["quiet"])
    set_verbose(given["verbose"])
    run_generate(GenerateRequest(
        prompt=prompt, flags=flags, prompts_file=prompts_file, cond=cond, latent_in=latent_in,
        latent_out=given["latent_out"], from_image=from_image, print_config=given["print_config"], control=control,
        **params.render_request(given),
    ))


@app.command()
@guard.handled
@params.takes(
    "upscaler_dir", *params.MODEL, "embeddings_dir", "prediction", "lora",
    *params.PROMPT, *params.SAMPLING, *params.FLOW, *params.NOISE, *params.COUNT, *params.HIRES, *params.INPAINT,
    *params.CONTROLNET, *params.SDXL, "output", "verbose", *params.GRID, *params.OUTPUT,
    "tome_ratio", *params.DEVICE, *params.VAE_TILING, "offload", *params.CLUSTER,
)
def img2img(
    prompt: Annotated[str, typer.Argument(help="The prompt.")],
    image: Annotated[str, typer.Option("--image", "-i", help="Input image ('-' = stdin).",
                                       autocompletion=cli_help.complete_image)],
    strength: Annotated[Optional[float], typer.Option("--strength", help="0..1: fraction of the schedule re-run.")] = None,
    mask: Annotated[Optional[str], typer.Option("--mask", help="Inpaint: white = repaint, black = keep (any model; "
                                                "strength defaults to 0.75, 1 with a 9-channel inpainting "
                                                "model).", autocompletion=cli_help.complete_image)] = None,
    width: Annotated[Optional[int], typer.Option("--width", "-W", help="Resize the input picture to this width "
                                                 "(multiple of 8; alone: the aspect ratio kept).")] = None,
    height: Annotated[Optional[int], typer.Option("--height", "-H", help="Resize the input picture to this height "
                                                  "(multiple of 8; alone: the aspect ratio kept).")] = None,
    **given,
) -> None:
    """Re-render an image guided by a prompt (VAE-encode, noise to the strength, sample the rest); with --mask or
    --pad, inpaint or outpaint it as A1111 does."""
    flags = params.config_flags(given, strength=strength, width=width, height=height)
    flags = params.with_controlnets(flags, params.control(given))
    guard.stdout_needed(given["output"], given["json_out"] or given["print_config"] or given["dry_run"])
    if given["print_config"]:
        return params.print_config(flags, given["config"], given["json_out"])
    from sdcli.runtime.console import set_quiet, set_verbose
    from sdcli.app.img2img import Img2ImgRequest, run_img2img

    set_quiet(given["quiet"])
    set_verbose(given["verbose"])
    run_img2img(Img2ImgRequest(prompt=prompt, image=image, flags=flags, mask=mask, **params.render_request(given)))


@app.command()
@guard.handled
@params.takes(
    "upscaler_dir", *params.MODEL, "prediction", "lora",
    *params.PROMPT, *params.SAMPLING, "sigmas", *params.FLOW, *params.NOISE, "width", "height", "seamless",
    *params.HIRES, "overwrite", "quiet", "progress", "json_out", "print_config",
    "tome_ratio", *params.DEVICE, "offload",
)
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
    **given,
) -> None:
    """X/Y/Z plot: render the prompt over axes of settings, one labelled plot per --z value (model loaded once)."""
    from sdcli.runtime.console import set_quiet
    from sdcli.app.sweep import SweepRequest, run_sweep

    set_quiet(given["quiet"])
    guard.stdout_needed(None, given["json_out"] or given["print_config"])
    flags = params.config_flags(given)
    if given["print_config"]:  # the config every cell starts from, before the axes vary it
        return params.print_config(flags, given["config"], given["json_out"])
    run_sweep(SweepRequest(prompt=prompt, x=x, y=y, z=z, output=output, flags=flags, config_file=given["config"],
                           loras=list(given["lora"] or []), keep_cells=keep_cells, json_path=json_path,
                           overwrite=given["overwrite"], progress=params.progress_mode(given["progress"]),
                           json_out=given["json_out"]))


@app.command()
@guard.handled
@params.takes(*params.MODEL, "embeddings_dir", "clip_skip", "overwrite", "quiet", "json_out", *params.DEVICE)
def encode(
    image: Annotated[Optional[str], typer.Argument(help="Image to encode into a VAE latent ('-' = stdin).")] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="Latent (.safetensors or ComfyUI .latent) or embedding file.")] = "",
    text: Annotated[Optional[str], typer.Option("--text", help="Encode this prompt with CLIP instead of an image.")] = None,
    **given,
) -> None:
    """Run one stage forward: an image -> a VAE latent file, or --text -> a CLIP embedding file."""
    from sdcli.runtime.console import set_quiet
    from sdcli.app.encode import EncodeRequest, run_encode

    set_quiet(given["quiet"])
    run_encode(EncodeRequest(image=image, text=text, output=output, flags=params.config_flags(given),
                             config_file=given["config"], overwrite=given["overwrite"], json_out=given["json_out"]))


@app.command()
@guard.handled
@params.takes("config", "model", "vae", "output", "verbose", "overwrite", "quiet", "json_out", *params.DEVICE,
              *params.VAE_TILING)
def decode(
    latent: Annotated[Path, typer.Argument(help="Latent file (ours or ComfyUI .latent).")],
    **given,
) -> None:
    """Run the VAE decoder: a latent file -> PNG."""
    from sdcli.runtime.console import set_quiet, set_verbose
    from sdcli.app.encode import DecodeRequest, run_decode

    set_quiet(given["quiet"])
    set_verbose(given["verbose"])
    flags = params.config_flags(given)
    guard.stdout_needed(given["output"], given["json_out"])
    run_decode(DecodeRequest(latent=latent, flags=flags, config_file=given["config"], overwrite=given["overwrite"],
                             json_out=given["json_out"]))


@app.command()
@guard.handled
def inspect(
    paths: Annotated[Optional[list[Path]], typer.Argument(
        help="Files or folders: checkpoint, LoRA, embedding, VAE, TAESD, ControlNet, upscaler, text encoder, "
             "image, latent. With --list: folders to list.", show_default=False)] = None,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Show how this prompt is tokenized.")] = None,
    listing: Annotated[bool, typer.Option("--list", help="List the model files in the configured folders "
                                          "(lora_dir, embeddings_dir, vae_dir, upscaler_dir, the model's folder) "
                                          "or in the folders given.")] = False,
    kind: Annotated[Optional[list[str]], typer.Option("--kind", help="With --list: only these (models, loras, "
                                                      "embeddings, vaes, controlnets, upscalers, text-encoders).",
                                                      show_default=False)] = None,
    hashes: Annotated[bool, typer.Option("--hash/--no-hash", help="Hash the files (reads each whole file).")] = True,
    embeddings_dir: opt.EmbeddingsDirOpt = None,
    config: opt.ConfigOpt = None,
    json_out: opt.JsonOpt = False,
) -> None:
    """Explain files (checkpoint, LoRA, embedding, VAE, TAESD, ControlNet, upscaler, text encoder, image metadata,
    latent), list the models in your folders (--list), or show a prompt's tokens."""
    from sdcli.app.inspect import run_inspect

    run_inspect(paths=list(paths or []), prompt=prompt, hashes=hashes, json_out=json_out,
                embeddings_dir=embeddings_dir, listing=listing, kinds=kind, config_file=config)


@app.command()
@guard.handled
@params.takes("upscaler_dir", "config", "overwrite", "quiet", "json_out", *params.DEVICE)
def upscale(
    images: Annotated[list[str], typer.Argument(help="Images to upscale ('-' = stdin).")],
    upscaler: Annotated[str, typer.Option("--upscaler", "-u", help="An upscaler model file (ESRGAN, Real-ESRGAN, "
                                          "...), a name in --upscaler-dir (R-ESRGAN 4x+, 4x-UltraSharp), or Lanczos / "
                                          "Nearest (with --scale).")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output file, '-' for stdout, or a template "
                                                  "with {index} {stem} {seed} {prompt} (default: {stem}-upscaled.png).")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="Scale factor (default: the model's own); the "
                                                   "model runs up to 3 times, then one Lanczos resize.")] = None,
    tile: Annotated[int, typer.Option("--tile", help="Tile side in input pixels (0 = the whole image at once).")] = 512,
    tile_overlap: Annotated[int, typer.Option("--tile-overlap", help="Pixels neighbouring tiles share.")] = 32,
    **given,
) -> None:
    """Upscale images with an upscaler model (A1111's Extras tab); metadata carried over."""
    from sdcli.app.upscale import UpscaleRequest, run_upscale
    from sdcli.runtime.console import set_quiet

    set_quiet(given["quiet"])
    guard.stdout_needed(output, given["json_out"])
    run_upscale(UpscaleRequest(images=list(images), upscaler=upscaler, output=output, scale=scale, tile=tile,
                               overlap=tile_overlap, flags=params.config_flags(given), config_file=given["config"],
                               overwrite=given["overwrite"], json_out=given["json_out"]))


@app.command()
@guard.handled
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
    overwrite: opt.OverwriteOpt = False,
    quiet: opt.QuietOpt = False,
) -> None:
    """Make a ControlNet hint from a picture (preprocessors that need no model)."""
    from sdcli.app.preprocess import PreprocessRequest, run_preprocess
    from sdcli.runtime.console import set_quiet

    set_quiet(quiet)
    run_preprocess(PreprocessRequest(kind, image, output, low, high, blur, level, invert_first, factor, seed, mask,
                                     overwrite))  # fmt: skip


@app.command()
@guard.handled
def convert(
    source: Annotated[Path, typer.Argument(help="A pickle checkpoint (.ckpt / .pt) to make .safetensors; with "
                                           "--quantize any model sdcli reads; a .gguf to dequantize.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The .safetensors or .gguf file to write.")],
    quantize: Annotated[Optional[str], typer.Option("--quantize", help="Write a GGUF file of this type: q8_0, "
                        "q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0, q3_k, q2_k (or f16, bf16, f32); the VAE, norms "
                        "and biases stay float.")] = None,
    type_rules: Annotated[Optional[str], typer.Option("--tensor-type-rules", help="Per-tensor types, "
                          "stable-diffusion.cpp's syntax: REGEX=TYPE,... (first match wins).")] = None,
    convs: Annotated[bool, typer.Option("--quantize-convs", help="Quantize conv kernels too, as 256-wide rows "
                     "(city96's layout: much smaller UNets; ComfyUI-GGUF reads it, stable-diffusion.cpp not).")] = False,
    overwrite: opt.OverwriteOpt = False,
) -> None:
    """Convert a .ckpt to .safetensors through the restricted loader (no code in the file can run); write a model as
    a quantized GGUF file (--quantize), or a GGUF back to .safetensors."""
    from sdcli.app.convert import run_convert

    run_convert(source, output, overwrite, quantize, type_rules, convs)


@app.command()
@guard.handled
@params.takes("model", "vae", "clip_l", "clip_g", "t5", "lora_dir", "embeddings_dir", "upscaler_dir", "config", "lora",
              "controlnet", "control_image", "refiner", "overwrite", "quiet", "json_out", "device", "offload")
def verify(
    images: Annotated[list[Path], typer.Argument(help="PNGs written by sdcli (their metadata holds the whole recipe).")],
    min_psnr: Annotated[float, typer.Option("--min-psnr", help="Pass when the re-render is at least this close (dB).")] = 40.0,
    image: Annotated[Optional[str], typer.Option("--image", "-i", help="img2img / inpainting images: the input "
                                                 "picture they were made from.")] = None,
    mask: Annotated[Optional[str], typer.Option("--mask", help="Inpainting images: their mask (default: the "
                                                "recorded mask file beside the image).")] = None,
    report: Annotated[
        Optional[str], typer.Option("--report", help="Write one self-contained HTML page: each stored image, its "
                                    "re-render, a difference heat map, the numbers; failures first.")
    ] = None,
    report_dir: Annotated[
        Optional[str], typer.Option("--report-dir", help="Like --report, as DIR/index.html with the PNGs beside it.")
    ] = None,
    **given,
) -> None:
    """Re-render images from their recorded settings and compare (PSNR, max difference); exit 9 if any drifted."""
    from sdcli.runtime.console import set_quiet
    from sdcli.app.verify import run_verify

    if min_psnr != min_psnr:  # NaN: every comparison with it is false, so nothing could pass or fail honestly
        from sdcli.runtime.errors import UsageError

        raise UsageError("option --min-psnr: must be a number of dB (inf: identical), got nan")
    set_quiet(given["quiet"])
    controlnets = {"models": list(given["controlnet"] or []), "images": list(given["control_image"] or [])}
    run_verify(images, params.config_flags(given), given["config"], min_psnr, given["json_out"],
               list(given["lora"] or []), report, report_dir, given["overwrite"], controlnets, image, mask)


@app.command()
@guard.handled
def serve(
    model: opt.ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on; beyond loopback it needs --api-auth "
                                      "(or --insecure).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0: a free one, said on stderr).")] = 7860,
    models_dir: Annotated[Optional[str], typer.Option("--models-dir", help="Checkpoints a request may switch to "
                                                      "(A1111's sd_model_checkpoint).")] = None,
    api_auth: Annotated[Optional[str], typer.Option("--api-auth", help="USER:PASS[,USER:PASS...]: HTTP basic "
                                                    "auth, as A1111's --api-auth.")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Listen beyond loopback without --api-auth.")] = False,
    max_request_mb: Annotated[float, typer.Option("--max-request-mb", help="Largest request body taken.")] = 64.0,
    config: opt.ConfigOpt = None,
    vae: opt.VaeOpt = None,
    lora_dir: opt.LoraDirOpt = None,
    embeddings_dir: opt.EmbeddingsDirOpt = None,
    dtype: opt.DtypeOpt = None,
    device: opt.DeviceOpt = None,
    offload: opt.OffloadOpt = None,
    quiet: opt.QuietOpt = False,
) -> None:
    """Keep a model loaded and answer A1111's web API, OpenAI's images API and `generate --server`."""
    from sdcli.runtime.console import set_quiet
    from sdcli.app.serve import ServeRequest, run_serve

    set_quiet(quiet)
    flags = _flags(model=model, vae=vae, lora_dir=lora_dir, embeddings_dir=embeddings_dir, dtype=dtype,
                   device=device, offload=offload)
    run_serve(ServeRequest(flags, config, host, port, models_dir, api_auth, insecure, max_request_mb))


cli_help.dress(app)  # after the last command: panels, examples and shown defaults for every command


def main() -> None:
    """Console-script entry point."""
    guard.prepare_process()
    try:
        hint = opt.peer_flag(sys.argv[1:])
        if hint is not None:
            raise UsageError(hint)
        app()
    except SdcliError as e:  # outside a command (`--help` with stdout closed): the same one line
        from sdcli.runtime import console

        console.error(str(e))
        sys.exit(e.exit_code)



if __name__ == "__main__":
    main()

"""`sdcli verify`: re-render sdcli PNGs from their recorded settings and compare the pixels; with --report /
--report-dir, one HTML page showing each stored image, its re-render and their difference. An img2img or inpainting
image is re-rendered from its input picture (--image) and mask (--mask, or the recorded mask file beside it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdcli import config as cfgmod
from sdcli.runtime import console
from sdcli.control import settings as control_config
from sdcli.runtime.errors import UsageError, VerificationError, quote, quote_list
from sdcli.jobs import Job, single_job
from sdcli.output.replay import RENDER_KEYS
from sdcli.app import hires_fix, refine, render
from sdcli.app.save import model_hash


@dataclass(frozen=True)
class Check:
    """One image to verify, read and checked before any model loads."""

    image: Path
    job: Job
    loras: list  # lora.LoraSpec
    recorded_hash: str | None  # the sha256 of the checkpoint the image records
    inputs: tuple[str, str | None] | None = None  # img2img / inpainting: (input picture, mask or None)


def run_verify(images: list[Path], flags: dict, config_file: Path | None, min_psnr: float, json_out: bool,
               loras: list[str] | None = None, report: str | None = None, report_dir: str | None = None,
               overwrite: bool = False, control: dict | None = None, init_image: str | None = None,
               mask: str | None = None) -> None:
    """Re-render sdcli images from their recorded settings (dtype included) and compare the pixels. LoRAs are
    files of the user's, like the model: they are given again with --lora, and checked against the record; so
    are ControlNets (--controlnet; the hint beside the image or --control-image: control_config.replayed).
    Every image is read, and the report's target checked, before a model loads; the report is written once,
    after every image; then exit 9 when any drifted."""
    from sdcli.output.targets import check_target

    checks = [_check(image, flags, config_file, loras or [], control or {}, (init_image, mask)) for image in images]
    if report and report_dir:
        raise UsageError("give --report FILE or --report-dir DIR, not both")
    if report:
        check_target(report, overwrite)
    if report_dir:  # every file the folder will get, not only its page: nothing there is replaced unasked
        from sdcli.output.report import report_dir_files

        for target in report_dir_files(report_dir, images):
            check_target(target, overwrite)
    entries = _verify_all(checks, min_psnr, json_out)
    _write_report(entries, report, report_dir, overwrite)
    failed = [e.result for e in entries if not e.result["passed"]]
    if len(failed) == 1 and len(entries) == 1:
        r = failed[0]
        raise VerificationError(f"{r['path']}: re-render drifted: PSNR {r['psnr']:.2f} dB < {min_psnr} dB "
                                f"(max difference {r['max_diff']} levels)")
    if failed:
        raise VerificationError(f"{len(failed)} of {len(entries)} images drifted (PSNR < {min_psnr} dB): "
                                + quote_list([r["path"] for r in failed], each=200))


def _check(image: Path, flags: dict, config_file: Path | None, loras: list[str], control: dict,
           given: tuple[str | None, str | None] = (None, None)) -> Check:  # fmt: skip
    from sdcli.output.replay import check_embeddings, check_refiner_given, from_image

    replay = from_image(image)
    if "grid_seeds" in replay.recorded:  # its metadata is the first image's: a re-render of that is not the sheet
        raise UsageError(f"{image}: a contact sheet (--grid), not one render: verify the images it shows (render "
                         "them without --grid-only), each against its own metadata")
    if replay.source != "sdcli" or replay.mode not in ("txt2img", "img2img", "inpaint"):
        raise UsageError(f"{image}: verify re-renders PNGs written by sdcli (this is {replay.source} "
                         f"{replay.mode}); use `generate --from-image` to replay other images")
    upscaled = replay.recorded.get("postprocessing")
    if isinstance(upscaled, list) and upscaled:  # `sdcli upscale` output: the render's record, another image
        steps = quote_list([str(step.get("name")) for step in upscaled if isinstance(step, dict)], each=60)
        raise UsageError(f"{image} was upscaled after it was rendered ({steps}): verify the image as it was rendered")
    inputs = _inputs(image, replay, *given) if replay.mode != "txt2img" else None
    recorded_dtype = replay.recorded.get("dtype")
    flags = {"dtype": recorded_dtype, **flags} if recorded_dtype else flags
    recorded_units = (replay.recorded.get("config") or {}).get("controlnets")
    if recorded_units:
        flags = {**flags, "controlnets": control_config.replayed(recorded_units, Path(image), control.get("models", []),
                                                                 control.get("images", []))}  # fmt: skip
    cfg = cfgmod.resolve(flags, config_file, replay.values)
    job = single_job(replay.prompt, cfg)
    render.check_samplers([job], cfg, lambda key: cfgmod.origin(key, flags, config_file, replay), warn=False)
    specs = render.lora_specs(loras, job)
    recorded_loras = [entry.get("name", "?") for entry in replay.recorded.get("loras", [])]
    missing = [name for name in recorded_loras if name not in {s.path.name for s in specs}]
    if missing:
        raise UsageError(f"{image} was made with LoRA {quote_list(missing)}: give them again with "
                         "--lora FILE[:WEIGHT]")
    check_embeddings(image, replay, cfg.embeddings_dir)
    check_refiner_given(replay, image, cfg.refiner)
    hires_fix.check_upscalers([job])
    control_config.check_files([job], cfg.model)
    return Check(image, job, specs, (replay.recorded.get("model") or {}).get("sha256"), inputs)


def _inputs(image: Path, replay, init_image: str | None, mask: str | None) -> tuple[str, str | None]:
    """(input picture, mask) of an img2img / inpainting image: the picture from --image (sdcli records no copy
    of it), the mask from --mask or beside the image under the name it recorded."""
    recorded = replay.recorded.get("mask")
    if init_image is None:
        raise UsageError(f"{image} was made by {replay.mode} from an input picture: give it with --image FILE"
                         + (" (and --mask FILE, unless the mask lies beside the image)" if recorded else ""))
    if mask is None and isinstance(recorded, str):
        mask = str(image.parent / Path(recorded).name)
        if not Path(mask).is_file():
            raise UsageError(f"{image} was made with the mask '{quote(recorded, 100)}', which is not beside it: give "
                             "it with "
                             "--mask FILE")
    return init_image, mask


def _verify_all(checks: list[Check], min_psnr: float, json_out: bool) -> list:
    """One ReportEntry per image, in order. A model is loaded once for the images that share its settings
    (model, VAE, dtype, device, prediction); LoRA sets switch between images on one model."""
    from sdcli.loading.lora import LoraState
    from sdcli.output.report import ReportEntry

    entries, loaded, key = [], None, None
    switching = len({tuple((s.path.resolve(), s.weight) for s in c.loras) for c in checks}) > 1
    for c in checks:
        cfg = c.job.cfg
        wanted = (cfg.model, cfg.vae, cfg.dtype, cfg.device, cfg.prediction, cfg.refiner)
        if wanted != key:
            loaded = refiner = None  # let the previous models go before the next ones load
            loaded, key = render.load(cfg), wanted
            refiner = refine.load_refiner(cfg, loaded)
            state = LoraState(loaded, keep_originals=switching)
        render.check_inpaint_model(loaded, cfg, (c.inputs or (None, None))[1] or cfg.pad)
        render.use_loras(state, c.loras)
        stored, again = _rerender(loaded, c, refiner)
        result = compare_images(stored, again)
        result.update(path=str(c.image), min_psnr=min_psnr, passed=result["psnr"] >= min_psnr,
                      same_model=None if c.recorded_hash is None else c.recorded_hash == model_hash(loaded))
        _report_verify(result, json_out)
        entries.append(ReportEntry(result, stored, again, _settings(c.job)))
    return entries


def _rerender(models, c: Check, refiner=None):
    """(the stored image, its re-render), as PIL images."""
    from sdcli import pipeline
    from sdcli.formats import images

    cfg = c.job.cfg
    init = _init(models, c) if c.inputs is not None else None
    p = render.prepare(models, cfg, c.job, init, refiner=refiner, nets=control_config.load_nets([c.job], models))
    with pipeline.seamless(models, cfg.seamless):
        latents = render.sample_batch(models, p, [cfg.seed], init,
                                       noise=render.noise_settings(cfg, [cfg.subseed]))
        decoded = pipeline.decode_latents(refine.decoder(models, p.refiner), latents, pipeline.vae_tiling(cfg))
        again = images.tensor_to_pil(decoded.images[0])
    if init is not None and init.inpaint is not None:
        again = init.inpaint.finish(again)
    return images.load_image(c.image)[0], _as_stored(again, c.image)


def _as_stored(picture, path):
    """A JPEG or WebP keeps its pixels lossily: the re-render goes through the same encoder, at the format and
    quality the file records, before it is compared (a PNG's re-render is compared as it is)."""
    import io

    from PIL import Image

    from sdcli.output.metadata import read_image_metadata
    from sdcli.output.targets import DEFAULT_QUALITY, image_bytes

    stored = (read_image_metadata(path).get("sdcli") or {}).get("file")
    if not isinstance(stored, dict) or stored.get("format") not in ("JPEG", "WEBP"):
        return picture
    quality = stored.get("quality") if isinstance(stored.get("quality"), int) else DEFAULT_QUALITY
    with Image.open(io.BytesIO(image_bytes(picture, "", {}, stored["format"], quality))) as img:
        return img.convert("RGB")


def _init(models, c: Check):
    """The img2img / inpainting start of a re-render, made from the given picture and mask as img2img makes it."""
    from sdcli.app import img2img
    from sdcli.formats import images

    picture, mask = c.inputs
    img = images.load_image(picture)[0]
    mask_image = images.load_mask_image(mask, img.size)[0] if mask else None
    return img2img.prepare_init(c.job.cfg, img, mask_image, [], mask, models)[0]


def _settings(job: Job) -> dict:
    """What the report shows of a re-render: the prompt and the recorded settings that shaped it."""
    shown = {"prompt": job.prompt}
    shown.update({k: v for k, v in job.cfg.to_dict().items()
                  if k in RENDER_KEYS and v is not None and v != "" or k in ("model", "dtype")})
    return shown


def _write_report(entries: list, report: str | None, report_dir: str | None, overwrite: bool) -> None:
    from sdcli.output import report as html_report

    if report:
        console.info(f"report: {html_report.write_report(entries, report, overwrite)}")
    elif report_dir:
        console.info(f"report: {html_report.write_report_dir(entries, report_dir, overwrite)}")


def compare_images(a, b) -> dict:
    """PSNR (dB, inf when identical) and the largest per-channel difference in 8-bit levels."""
    import math

    import torch

    if a.size != b.size:
        return {"psnr": 0.0, "max_diff": 255, "identical": False, "note": f"sizes differ: {a.size} vs {b.size}"}
    x = torch.frombuffer(bytearray(a.tobytes()), dtype=torch.uint8).float()
    y = torch.frombuffer(bytearray(b.tobytes()), dtype=torch.uint8).float()
    mse = torch.mean((x - y) ** 2).item()
    psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
    return {"psnr": psnr, "max_diff": int((x - y).abs().max().item()), "identical": mse == 0}


def _report_verify(report: dict, json_out: bool) -> None:
    from sdcli.output.report import verify_json

    if json_out:
        result = verify_json(report)
        return console.emit_result(result.pop("kind"), result.pop("path"), result)
    verdict = "identical" if report["identical"] else f"PSNR {report['psnr']:.2f} dB, max diff {report['max_diff']}"
    if report.get("same_model") is False:
        verdict += "; note: not the checkpoint the image was made with (sha256 differs)"
    console.info(f"{report['path']}: {'ok' if report['passed'] else 'DRIFT'} ({verdict})")

"""`sdcli verify`: re-render an sdcli text-to-image PNG from its recorded settings and compare the pixels."""

from __future__ import annotations

from pathlib import Path

from .. import config as cfgmod
from .. import console, control_config
from ..errors import UsageError, VerificationError
from ..jobs import single_job
from . import render
from .save import model_hash


def run_verify(image: Path, flags: dict, config_file: Path | None, min_psnr: float, json_out: bool,
               loras: list[str] | None = None, control: dict | None = None) -> None:
    """Re-render an sdcli image from its recorded settings (dtype included) and compare the pixels. LoRAs are
    files of the user's, like the model: they are given again with --lora, and checked against the record;
    so are ControlNets (--controlnet; the hint beside the image or --control-image: control_config.replayed)."""
    from .. import images, pipeline
    from ..lora import LoraState
    from ..replay import from_image

    replay = from_image(image)
    if replay.source != "sdcli" or replay.mode != "txt2img":
        raise UsageError(f"{image}: verify re-renders text-to-image PNGs written by sdcli (this is {replay.source} "
                         f"{replay.mode}); use `generate --from-image` to replay other images")
    recorded_dtype = replay.recorded.get("dtype")
    flags = {"dtype": recorded_dtype, **flags} if recorded_dtype else flags
    recorded_units = (replay.recorded.get("config") or {}).get("controlnets")
    if recorded_units:
        control = control or {}
        flags = {**flags, "controlnets": control_config.replayed(recorded_units, Path(image), control.get("models", []),
                                                                 control.get("images", []))}  # fmt: skip
    cfg = cfgmod.resolve(flags, config_file, replay.values)
    job = single_job(replay.prompt, cfg)
    render.check_samplers([job], cfg, lambda key: cfgmod.origin(key, flags, config_file, replay))
    specs = render.lora_specs(loras or [], job)
    recorded_loras = [entry.get("name", "?") for entry in replay.recorded.get("loras", [])]
    missing = [name for name in recorded_loras if name not in {s.path.name for s in specs}]
    if missing:
        raise UsageError(f"{image} was made with LoRA {', '.join(missing)}: give them again with "
                         "--lora FILE[:WEIGHT]")
    control_config.check_files([job], cfg.model)
    models = render.load(cfg)
    render.check_inpaint_model(models, cfg, None)
    render.use_loras(LoraState(models), specs)
    p = render.prepare(models, cfg, job, nets=control_config.load_nets([job], models))
    with pipeline.seamless(models, cfg.seamless):
        latents = render.txt2img_passes(models, p.plan, p.cond, p.uncond, [cfg.seed], p.size, p.hires)
        again = images.tensor_to_pil(pipeline.decode_latents(models, latents).images[0])
    result = compare_images(images.load_image(image)[0], again)
    recorded_hash = (replay.recorded.get("model") or {}).get("sha256")
    result.update(path=str(image), min_psnr=min_psnr, passed=result["psnr"] >= min_psnr,
                  same_model=None if recorded_hash is None else recorded_hash == model_hash(models))
    _report_verify(result, json_out)
    if not result["passed"]:
        raise VerificationError(f"{image}: re-render drifted: PSNR {result['psnr']:.2f} dB < {min_psnr} dB "
                                f"(max difference {result['max_diff']} levels)")


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
    if json_out:
        shown = {**report, "psnr": None if report["psnr"] == float("inf") else round(report["psnr"], 3)}
        return console.emit_json(shown)
    verdict = "identical" if report["identical"] else f"PSNR {report['psnr']:.2f} dB, max diff {report['max_diff']}"
    if report.get("same_model") is False:
        verdict += "; note: not the checkpoint the image was made with (sha256 differs)"
    console.info(f"{report['path']}: {'ok' if report['passed'] else 'DRIFT'} ({verdict})")

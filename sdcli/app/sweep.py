"""`sdcli sweep`: A1111's X/Y/Z plot from the command line. Every cell is a text-to-image render of the prompt
with the axes' values set (app/sweep_axes.py parses and expands them); each z value gets one labelled plot
(grid.plot_grid), and a JSON file beside the plot (STEM.json of -o, or --json-out) lists every cell's settings,
its full config, its place in its plot and a `generate` command that renders it alone.

Everything is checked before the model loads: the axes, every cell's sampler/schedule, its LoRA files, every
output path. The model is loaded once. A seed of -1 is drawn once, before the cells are made (A1111), so all
cells share it. Text encodings are cached by (clip_skip, LoRA set) then (text, negative): cells that change
only the sampler, schedule, cfg, steps (no prompt editing) or seed encode nothing. Cells are rendered grouped by
their LoRA set, so a `lora:NAME` axis merges each weight once. A cell is rendered exactly as `generate` renders
it alone (batch of one, same code path), so a kept cell (--keep-cells) equals that render byte for byte.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from sdcli import __version__

from sdcli.runtime import console

from sdcli.app import sweep_axes
from sdcli import config as cfgmod
from sdcli.config import RunConfig
from sdcli.runtime.errors import BadInputError, UsageError, quote
from sdcli.jobs import Job, draw_seed, single_job, with_seed
from sdcli.app import hires_fix, render, save

# Config keys a text-to-image sweep cannot vary, beyond sweep_axes.FIXED_KEYS: a value no cell would use would
# still be recorded in the cell's metadata, claiming a render that never happened.
_NO_REFINER = "sweep does not run an SDXL refiner yet, so no cell would use it"
NOT_SWEPT = {
    "strength": "sweep renders text to image; strength is img2img's (sweep hires_strength with hires_scale)",
    "prediction": "the model is loaded once per sweep",
    "refiner": _NO_REFINER,
    "refiner_switch": _NO_REFINER,
    "aesthetic_score": _NO_REFINER,
    "negative_aesthetic_score": _NO_REFINER,
    "ray": "a sweep renders here, not on a cluster",
}


@dataclass
class SweepRequest:
    prompt: str
    x: str
    output: str  # the plot; with several z values STEM-zK.SUFFIX for the K-th (from 0)
    flags: dict
    y: str | None = None
    z: str | None = None
    config_file: Path | None = None
    loras: list[str] = field(default_factory=list)  # --lora FILE[:WEIGHT] for every cell
    keep_cells: str | None = None  # folder for each cell's PNG (z{iz}-y{iy}-x{ix}.png)
    json_path: str | None = None  # default: STEM.json beside the plot
    overwrite: bool = False
    progress: str = "auto"
    json_out: bool = False  # --json: a line per file written (each kept cell, each plot, the cells' JSON file)


@dataclass(frozen=True)
class PlannedCell:
    cell: sweep_axes.Cell
    job: Job  # the cell's prompt and full config
    loras: tuple  # lora.LoraSpec, --lora files then the LoRA axes
    keep: Path | None  # where its PNG goes with --keep-cells
    given_loras: tuple = ()  # the LoRAs not named by the prompt's tags (--lora, the LoRA axes): the command's --lora


def run_sweep(req: SweepRequest) -> None:
    x, y, z = (_axis(spec, option) if spec else None for spec, option in ((req.x, "--x"), (req.y, "--y"),
                                                                          (req.z, "--z")))
    varied = any(a is not None and a.key == "subseed_strength" for a in (x, y, z))
    base = with_seed(cfgmod.resolve(req.flags, req.config_file), variation=varied)  # one subseed for every cell
    if base.refiner:
        raise UsageError("a refiner (config key 'refiner') is not supported by sweep yet")
    render.check_samplers([single_job(req.prompt, base)], base,
                          lambda key: cfgmod.origin(key, req.flags, req.config_file), warn=False)
    cells = sweep_axes.expand(req.prompt, base.negative, x, y, z)
    planned = [_plan_cell(c, base, req) for c in cells]
    for p in planned:
        _check_cell(p, base)
    hires_fix.check_upscalers([p.job for p in planned])
    render.warn_unused_params([p.job for p in planned])
    plots = _plot_paths(req.output, len(z.values) if z else 1)
    json_path = Path(req.json_path) if req.json_path else Path(req.output).with_suffix(".json")
    _check_outputs(plots, json_path, [p.keep for p in planned if p.keep], req.overwrite)
    models = render.load(base)
    render.check_inpaint_model(models, base, None)
    _check_plot_sizes(models, planned, (x, y, z), plots)
    done = _render_cells(models, planned, req)
    records = []
    for iz, path in enumerate(plots):
        in_plot = [(p, done[id(p)]) for p in planned if p.cell.index[2] == iz]
        plot_records = _write_plot(path, in_plot, (x, y, z), iz, req, json_path)
        _said(req, "plot", path, {"z": z.labels()[iz] if z else None, "cells": len(plot_records)})
        records += plot_records
    _write_json(json_path, req, base, (x, y, z), plots, records)
    _said(req, "cells", json_path, {"cells": len(records), "plots": [str(p) for p in plots]})
    console.info(f"sweep: {len(planned)} cells in {len(plots)} plot{'s' if len(plots) > 1 else ''}: "
                 f"{', '.join(map(str, plots))}; cells listed in {json_path}")


# --- planning ------------------------------------------------------------------------------------

def _axis(spec: str, option: str) -> sweep_axes.Axis:
    axis = sweep_axes.parse_axis(spec, option)
    if axis.key in NOT_SWEPT:
        raise UsageError(f"{option} {axis.key}: cannot be swept ({NOT_SWEPT[axis.key]})")
    if axis.key in ("seed", "subseed"):  # -1 draws a seed, once, so the cell can be replayed
        axis = dataclasses.replace(axis, values=tuple(draw_seed() if v == -1 else v for v in axis.values))
    return axis


def _plan_cell(cell: sweep_axes.Cell, base: RunConfig, req: SweepRequest) -> PlannedCell:
    from sdcli.loading.lora import check_file, resolve_prompt_lora

    prefix = sweep_axes.LORA_PREFIX
    settings = {k: v for k, v in cell.settings.items() if not k.startswith(prefix)}
    cfg = dataclasses.replace(base, negative=cell.negative, **settings)
    job = single_job(cell.prompt, cfg)  # the prompt checked as generate checks it (seed already drawn)
    swept = {k[len(prefix):]: w for k, w in cell.settings.items() if k.startswith(prefix)}  # LoRA name -> weight
    for tag in job.loras:
        if tag.name in swept:
            raise UsageError(f"lora:{tag.name}: the prompt's <lora:{tag.name}:...> tag sets this LoRA's weight too; "
                             "sweep the tag with prompt_sr instead, or drop it from the prompt")
    specs = render.lora_specs(req.loras, job)
    tagged = specs[len(specs) - len(job.loras):] if job.loras else []  # the prompt's tags: the command keeps them
    for name, weight in swept.items():
        spec = resolve_prompt_lora(name, weight, cfg.lora_dir)
        check_file(spec)
        same = [i for i, s in enumerate(specs) if s.path.resolve() == spec.path.resolve()]
        specs = [s for i, s in enumerate(specs) if i not in same] + [spec]  # the axis's weight replaces --lora's
    ix, iy, iz = cell.index
    keep = Path(req.keep_cells) / f"z{iz}-y{iy}-x{ix}.png" if req.keep_cells else None
    given = tuple(s for s in specs if not any(s is t for t in tagged))
    return PlannedCell(cell, job, tuple(specs), keep, given)


def _check_cell(p: PlannedCell, base: RunConfig) -> None:
    """The cell's sampler, schedule and sigmas (the base's are good, so an error is the axes')."""
    try:
        render.check_samplers([p.job], base, warn=False)
    except (UsageError, BadInputError) as e:
        swept = ", ".join(f"{k}={quote(v, 60)}" for k, v in p.cell.settings.items())
        raise UsageError(f"sweep cell {swept}: {e}") from None


def _plot_paths(output: str, count: int) -> list[Path]:
    if output == "-":
        raise UsageError("sweep writes a plot and a JSON file: give -o a file name, not '-'")
    path = Path(output)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}-z{k}{path.suffix}") for k in range(count)]


def _check_outputs(plots: list[Path], json_path: Path, kept: list[Path], overwrite: bool) -> None:
    from sdcli.output.targets import check_target

    seen: set[Path] = set()
    for path in [*plots, json_path, *kept]:
        if path in seen:
            raise UsageError(f"two outputs of this sweep would be written to {path}")
        seen.add(path)
        check_target(path, overwrite)


def _check_plot_sizes(models, planned: list[PlannedCell], axes: tuple, plots: list[Path]) -> None:
    """Each plot's size from its cells' sizes (the family's, now that it is loaded) and its labels: one that could
    not be made is refused before the first cell renders (grid.check_sheet_size)."""
    from sdcli.output import grid

    x, y, z = axes
    for iz, path in enumerate(plots):
        sizes = [render._final_size(p.job.cfg, models, None) for p in planned if p.cell.index[2] == iz]
        w, h = max(s[0] for s in sizes), max(s[1] for s in sizes)
        columns, rows = w * len(x.values), h * (len(y.values) if y else 1)
        grid.check_sheet_size(columns, rows, f"the plot {path}")  # the cells alone, before laying out labels
        layout = grid.plot_layout(w, h, x.labels(), y.labels() if y else [""], z.labels()[iz] if z else "")
        grid.check_sheet_size(*layout.size, f"the plot {path}")


# --- rendering -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Done:
    image: object  # PIL image
    infotext: str
    meta: dict  # the cell's image metadata (save.metadata): its full config, seed, LoRAs


def _render_cells(models, planned: list[PlannedCell], req: SweepRequest) -> dict[int, Done]:
    """id(planned cell) -> its image, rendered grouped by LoRA set, text encodings shared where they can be."""
    from sdcli.loading.lora import LoraState

    def lora_key(p: PlannedCell) -> tuple:
        return tuple((s.path.resolve(), s.weight) for s in p.loras)

    state = LoraState(models, keep_originals=len({lora_key(p) for p in planned}) > 1)
    encodings: dict[tuple, dict] = {}  # (clip_skip, LoRA set) -> (text, negative) -> encoding
    done = {}
    for n, p in enumerate(sorted(planned, key=lambda p: [(str(path), w) for path, w in lora_key(p)]), start=1):
        render.use_loras(state, list(p.loras))
        encoded = encodings.setdefault((p.job.cfg.clip_skip, lora_key(p)), {})
        done[id(p)] = _render_cell(models, p, req, encoded, tuple(state.reports))
        console.info(f"cell {n}/{len(planned)}: {_describe(p.cell)}")
    return done


def _render_cell(models, p: PlannedCell, req: SweepRequest, encoded: dict, loras: tuple) -> Done:
    """One cell as `generate` renders one image (render.prepare, txt2img_passes, decode, save.metadata)."""
    from sdcli import pipeline
    from sdcli.formats import images
    from sdcli.output.targets import save_png
    from sdcli.app.progress import Progress

    cfg = p.job.cfg
    prepared = render.prepare(models, cfg, p.job, encoded=encoded)
    with pipeline.seamless(models, cfg.seamless):
        with Progress([cfg.seed], len(prepared.plan.sigmas) - 1, req.progress) as step:
            latents = render.txt2img_passes(models, prepared.plan, prepared.cond, prepared.uncond, [cfg.seed],
                                            prepared.size, prepared.hires, callback=step,
                                            noise=render.noise_settings(cfg, [cfg.subseed]))
        decoded = pipeline.decode_latents(models, latents, pipeline.vae_tiling(cfg))
    target = render.Target(p.job, 0, cfg.seed, p.keep or Path("-"))
    meta = save.metadata(models, target, prepared.size, decoded.fallbacks, None, prepared.hires, loras)
    text = save.infotext(models, target, prepared.size, None, prepared.hires, loras)
    image = images.tensor_to_pil(decoded.images[0])
    if p.keep is not None:
        save_png(image, p.keep, text, meta, overwrite=req.overwrite)
        _said(req, "cell", p.keep, {"index": list(p.cell.index), "seed": cfg.seed, "prompt": p.job.prompt,
                                    "settings": dict(p.cell.settings)})
    return Done(image, text, meta)


def _said(req: SweepRequest, kind: str, path: Path, fields: dict) -> None:
    """With --json, the line of one file written (console.emit_result's envelope); stderr says the rest."""
    if req.json_out:
        console.emit_result(kind, path, fields)


def _describe(cell: sweep_axes.Cell) -> str:
    return ", ".join([quote(sweep_axes.label(k, v), 80) for k, v in cell.settings.items()] + [quote(repr(cell.prompt))])


# --- plots and the JSON file ---------------------------------------------------------------------

def _write_plot(path: Path, cells: list, axes: tuple, iz: int, req: SweepRequest, json_path: Path) -> list[dict]:
    """The plot of one z value: cells padded to one size (a width/height axis makes them differ), labelled;
    its metadata holds the first cell's infotext and, per cell, the settings and a command that renders it."""
    from sdcli.output import grid
    from sdcli.output.targets import save_png

    x, y, z = axes
    pictures = _same_size([done.image for _, done in cells])
    x_labels, y_labels = x.labels(), y.labels() if y else [""]
    title = z.labels()[iz] if z else ""
    plot = grid.plot_grid(pictures, x_labels, y_labels, title=title)
    layout = grid.plot_layout(*pictures[0].size, x_labels, y_labels, title)
    w, h = pictures[0].size
    records = [_record(p, done, path, (cx, cy, cx + w, cy + h)) for (p, done), (cx, cy) in zip(cells, layout.cells)]
    meta = {"sdcli_version": __version__, "mode": "sweep", "sweep_json": json_path.name, "z": title,
            "axes": _axes_json(axes), "cells": records}
    save_png(plot, path, cells[0][1].infotext, meta, overwrite=req.overwrite)
    return records


def _same_size(pictures: list) -> list:
    """Cells of different sizes centred on black at the largest size (the plot's cells are all alike)."""
    from PIL import Image

    w, h = max(p.width for p in pictures), max(p.height for p in pictures)
    out = []
    for pic in pictures:
        if pic.size != (w, h):
            canvas = Image.new("RGB", (w, h), "black")
            canvas.paste(pic, ((w - pic.width) // 2, (h - pic.height) // 2))
            pic = canvas
        out.append(pic)
    return out


def _record(p: PlannedCell, done: Done, plot: Path, box: tuple) -> dict:
    return {"index": list(p.cell.index), "prompt": p.cell.prompt, "negative": p.cell.negative,
            "settings": p.cell.settings, "seed": done.meta["seed"], "config": done.meta["config"],
            "loras": done.meta.get("loras", []), "path": str(p.keep) if p.keep else None, "plot": str(plot),
            "box": list(box), "command": reproduce_command(p, done.meta)}


REPLAYED_FLAGS = ("negative", "steps", "sampler", "schedule", "sigmas", "cfg", "guidance_rescale", "seed", "width",
                  "height", "clip_skip", "seamless", "hires_scale", "hires_strength", "hires_steps", "hires_upscaler",
                  "dtype")
# A1111's noise and sampler parameters: on the command line only where they differ from their defaults.
NOISE_FLAGS = ("rng", "subseed", "subseed_strength", "seed_resize_from", "ensd", "eta", "s_churn", "s_tmin", "s_tmax",
               "s_noise")


def reproduce_command(p: PlannedCell, meta: dict) -> str:
    """A `generate` command line that renders this cell alone, run from the folder the sweep was run in: the
    model, VAE, LoRA files and folders as the sweep was given them (an image records file names only), then
    the recorded settings."""
    recorded, cfg = meta["config"], p.job.cfg
    words = ["sdcli", "generate", p.cell.prompt, "-m", cfg.model or "MODEL"]
    for flag, value in (("--vae", cfg.vae), ("--lora-dir", cfg.lora_dir if p.job.loras else None),
                        ("--embeddings-dir", cfg.embeddings_dir)):
        if value:
            words += [flag, str(value)]
    for key in REPLAYED_FLAGS:
        value = recorded.get(key)
        if value is None or (key == "negative" and value == "") or (key == "schedule" and recorded.get("sigmas")):
            continue  # with --sigmas the schedule is recorded as 'custom', which is not an option value
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else f"--no-{key}")
        else:
            words += [flag, str(value)]
    defaults = RunConfig()
    for key in NOISE_FLAGS:
        value = recorded.get(key)
        if value is not None and value != getattr(defaults, key):
            words += ["--" + key.replace("_", "-"), str(value)]
    for spec in p.given_loras:
        words += ["--lora", f"{spec.path}:{spec.weight}"]
    return shlex.join(words)


def _axes_json(axes: tuple) -> dict:
    return {name: {"key": a.key, "spec": a.spec, "values": list(a.values), "labels": a.labels()}
            for name, a in zip("xyz", axes) if a is not None}


def _write_json(path: Path, req: SweepRequest, base: RunConfig, axes: tuple, plots: list[Path],
                records: list[dict]) -> None:
    import json

    from sdcli.output.targets import atomic_write_bytes

    doc = {"sdcli_version": __version__, "prompt": req.prompt, "negative": base.negative, "seed": base.seed,
           "axes": _axes_json(axes), "plots": [str(p) for p in plots], "cells": records}
    text = json.dumps(doc, ensure_ascii=False, indent=1, default=str) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=req.overwrite)

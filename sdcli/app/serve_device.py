"""The server's one render thread: requests become tickets, run one at a time in arrival order on the loaded model,
with the same functions a local run uses (render.prepare / render.render_batch), so an image from the server is
the PNG `sdcli generate` writes for the same settings, byte for byte.

A ticket can be interrupted (A1111's /interrupt: the current job ends at its next step, the images finished before
it are kept), skipped (/skip: the current batch is dropped, the next one starts) or cancelled (its client went
away: it ends like an interrupt, and a ticket still waiting is never started). The thread itself only ends with the
server. Nothing here knows HTTP: app/serve.py hands tickets in and reads their results and events.

Files named by a request are looked up by name inside the folders the server was configured with (`--models-dir`,
`vae_dir`, `lora_dir`, `embeddings_dir`), never as paths: `Folders` is the one place that resolves them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from sdcli.config import RunConfig
from sdcli.runtime import console
from sdcli.runtime.errors import BadInputError, ModelNotFoundError, SdcliError, UsageError, quote

MODEL_SUFFIXES = (".safetensors", ".ckpt")
VAE_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".pth")
SERVER_DEFAULTS = ("Automatic", "None", "")  # A1111's sd_vae values meaning the checkpoint's own (or --vae)


class Stopped(SdcliError):
    """The job was interrupted (A1111 /interrupt) or its client went away: it ends at the next step."""

    exit_code = 130


class Skipped(Exception):
    """A1111 /skip: the batch being sampled is dropped; the job goes on with the next one."""


# --- the folders a request may name files in ----------------------------------------------------------------

@dataclass(frozen=True)
class Folders:
    """The startup model and the configured folders; a request names files in them, never paths."""

    model: str  # --model: a file, a diffusers folder or a hub id
    models_dir: Path | None = None
    vae_dir: Path | None = None
    lora_dir: Path | None = None

    def models(self) -> dict[str, str]:
        """name (relative to --models-dir; the startup model by its file name) -> path or hub id."""
        found = {Path(self.model).name: self.model}
        found.update(_files(self.models_dir, MODEL_SUFFIXES))
        return found

    def find_model(self, asked: str, titles: dict[str, str]) -> str:
        """A checkpoint by A1111 title ("name [hash]"), name, file name or stem; ModelNotFoundError otherwise."""
        models = self.models()
        by_title = {title: models[name] for name, title in titles.items() if name in models}
        plain = asked.strip()
        head = plain.rpartition(" [")[0] if plain.endswith("]") else plain
        for candidate in (plain, head):
            if candidate in by_title:
                return by_title[candidate]
            if candidate in models:
                return models[candidate]
            stems = [path for name, path in models.items() if Path(name).with_suffix("").as_posix() == candidate
                     or Path(name).stem == candidate]
            if len(stems) == 1:
                return stems[0]
        raise ModelNotFoundError(f"model {quote(repr(asked))} not found (the server serves {', '.join(models)})")

    def vaes(self) -> dict[str, str]:
        return _files(self.vae_dir, VAE_SUFFIXES)

    def find_vae(self, asked: str) -> str | None:
        """sd_vae: None for the checkpoint's own (A1111's Automatic / None), else a file of vae_dir."""
        if asked in SERVER_DEFAULTS:
            return None
        vaes = self.vaes()
        if asked in vaes:
            return vaes[asked]
        stems = [path for name, path in vaes.items() if Path(name).stem == asked]
        if len(stems) == 1:
            return stems[0]
        raise ModelNotFoundError(f"VAE {quote(repr(asked))} not found in the server's vae_dir")

    def loras(self) -> dict[str, str]:
        return _files(self.lora_dir, (".safetensors",))

    def find_lora(self, asked: str) -> Path:
        """A LoRA by stem (a <lora:NAME> tag) or file name (a --lora flag sent by `--server`) under lora_dir:
        sub-folders too, as A1111 and sdcli's own tags look; a name with a path in it is refused."""
        if not asked or Path(asked).name != asked or asked in (".", ".."):
            raise UsageError(f"LoRA {quote(repr(asked))}: name a file of the server's lora_dir, without a folder")
        matches = [p for name, p in self.loras().items() if Path(name).name in (asked, f"{asked}.safetensors")]
        if len(matches) != 1:
            where = "no lora_dir is configured on the server" if self.lora_dir is None else \
                f"{len(matches) or 'no'} match{'es' if len(matches) > 1 else ''} in the server's lora_dir"
            raise ModelNotFoundError(f"LoRA {quote(repr(asked))}: {where}")
        return Path(matches[0])


def _files(folder: Path | None, suffixes: tuple[str, ...]) -> dict[str, str]:
    """name relative to `folder` (posix) -> path, for every file with one of `suffixes` below it, sorted."""
    if folder is None or not folder.is_dir():
        return {}
    found = (p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
    return {p.relative_to(folder).as_posix(): str(p) for p in sorted(found)}


def lora_specs(folders: Folders, flags: list, job) -> list:
    """--lora files (by name, from --server) then the prompt's <lora:NAME:W> tags, found in the server's
    lora_dir only, each sniffed as a local run does before it loads anything."""
    from sdcli.loading.lora import LoraSpec, check_file

    specs = [LoraSpec(folders.find_lora(name), weight) for name, weight in flags]
    specs += [LoraSpec(folders.find_lora(tag.name), tag.weight) for tag in job.loras]
    for spec in specs:
        check_file(spec)
    return specs


def check_sampler(job) -> None:
    """The job's sampler, schedule and sigmas, checked as a local run checks them before anything loads."""
    from sdcli.app.render import check_samplers

    check_samplers([job])  # its name was checked (never "help"); this checks the schedule and the sigmas


class scratch_file:
    """A request's upload as a file of the server's private scratch folder, removed afterwards: the readers a
    local run uses (images.load_image, metadata) take paths, and so get the same checks."""

    def __init__(self, scratch: Path, name: str, data: bytes):
        self.folder = Path(tempfile.mkdtemp(dir=scratch))
        self.path = self.folder / (Path(name).name or "upload.png")
        self.path.write_bytes(data)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def named(load, path: Path, name: str):
    try:
        return load()
    except SdcliError as e:
        raise BadInputError(str(e).replace(str(path), name)) from None


# --- what a request asks the device for ---------------------------------------------------------------------

@dataclass
class Init:
    """img2img's inputs, decoded: the picture (PIL, RGB, a multiple of 8), its notes, the mask (PIL, "L")."""

    image: Any
    notes: list[str]
    mask: Any = None
    mask_name: str | None = None


@dataclass
class RenderSpec:
    """One job of a request: the job (its cfg the server's with the request's settings), the images to make."""

    job: Any  # jobs.Job; its cfg.model / cfg.vae are set on the device, once the model is known
    seeds: list[int]
    subseeds: list  # each image's variation seed (render.image_seeds); None: the job's own
    indices: list[int]  # the client's image numbers (a prompts file's run index with --server)
    loras: list = field(default_factory=list)  # lora.LoraSpec, resolved in the server's lora_dir
    init: Init | None = None
    model: str | None = None  # a checkpoint of Folders.models(); None: the server's current one
    vae: str | None = "current"  # "current": the current VAE choice; None: the checkpoint's own; else a file


@dataclass
class Result:
    """What a job made: each image as render.Rendered, in order, and whether it was cut short."""

    images: list
    interrupted: bool = False
    model: dict = field(default_factory=dict)  # name, hash, vae name and hash: for A1111's info
    started: float = 0.0
    finished: float = 0.0


# --- tickets and the thread ---------------------------------------------------------------------------------

class Ticket:
    """One request's work on the device thread. Its state is read by the HTTP side (progress) while it runs."""

    def __init__(self, work: Callable[[Ticket], Any], name: str, listener: Callable[[dict], None] | None = None):
        self.work, self.name, self.listener = work, name, listener
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.cancelled = threading.Event()
        self.interrupted = self.skipped = False
        self.batch, self.batches, self.step, self.steps = 0, 0, 0, 0
        self.started: float | None = None
        self.timestamp = "0"
        self.latest = None  # the newest x0 estimate of image 0 (CPU), for /progress's live preview
        self.preview_wanted = 0.0  # time.time() until which someone polls /progress for the image
        self.latent = None  # the loaded family's LatentSpec: how the preview turns the latent into RGB

    def emit(self, event: dict) -> None:
        if self.listener is not None:
            self.listener(event)

    def on_step(self, i: int, total: int, _x, denoised) -> None:
        """The sampler callback (render.render_batch's request hook): counters, preview, stop checks."""
        self.step, self.steps = i + 1, total
        if time.time() < self.preview_wanted:
            self.latest = denoised[:1].detach().float().cpu()
        self.emit({"event": "step", "step": i + 1, "total": total, "batch": self.batch})
        self.check()

    def check(self) -> None:
        if self.cancelled.is_set() or self.interrupted:
            raise Stopped("interrupted")
        if self.skipped:
            self.skipped = False
            raise Skipped()

    def state(self) -> dict:
        """A1111's shared.state.dict() for this job."""
        return {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                "job": self.name, "job_count": self.batches, "job_timestamp": self.timestamp, "job_no": self.batch,
                "sampling_step": self.step, "sampling_steps": self.steps}


class Device:
    """Runs tickets one at a time, in the order they were submitted, on one daemon thread."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.current: Ticket | None = None
        self.waiting: list[Ticket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="sdcli-device", daemon=True)
        self.thread.start()

    def submit(self, ticket: Ticket) -> Ticket:
        with self.lock:
            self.waiting.append(ticket)
            self.queue.put(ticket)
        return ticket

    def ahead_of(self, ticket: Ticket) -> int:
        with self.lock:
            return self.waiting.index(ticket) + (self.current is not None) if ticket in self.waiting else 0

    def interrupt(self) -> None:
        current = self.current
        if current is not None:
            current.interrupted = True

    def skip(self) -> None:
        current = self.current
        if current is not None:
            current.skipped = True

    def stop(self) -> None:
        """At shutdown: the running job interrupted, every waiting one cancelled, the thread told to end."""
        with self.lock:
            for ticket in self.waiting:
                ticket.cancelled.set()
        self.interrupt()
        self.queue.put(None)

    def _loop(self) -> None:
        while True:
            ticket = self.queue.get()
            if ticket is None:
                return
            with self.lock:
                self.waiting.remove(ticket)
                self.current = ticket
            try:
                if ticket.cancelled.is_set():  # its client left while it waited: never started
                    raise Stopped("cancelled before it started")
                ticket.started, ticket.timestamp = time.time(), time.strftime("%Y%m%d%H%M%S")
                ticket.future.set_result(ticket.work(ticket))
            except BaseException as e:  # noqa: BLE001 - every failure goes to the request; the thread goes on
                ticket.future.set_exception(e)
            finally:
                with self.lock:
                    self.current = None


# --- the loaded model (device thread only) ------------------------------------------------------------------

class Service:
    """The server's model: loaded once with the residency policy of a local run, switched when a request (or
    POST /options) names another checkpoint or VAE. Only the device thread calls its methods."""

    def __init__(self, base: RunConfig, folders: Folders):
        self.base, self.folders = base, folders
        self.current: tuple[str, str | None] = (base.model, base.vae)  # what a request that names none gets
        self.loaded: tuple[str, str | None] | None = None
        self.models = self.lora_state = self.placement = None
        self.hashes: dict[str, str] = {}  # model name (Folders.models) -> sha256, once known
        self.clip_skip: int | None = None  # POST /options CLIP_stop_at_last_layers

    def ensure(self, model: str | None, vae: str | None = "current"):
        """The models for (model, vae) loaded (the previous ones let go first); `vae` "current" keeps the
        current choice, None the checkpoint's own."""
        from sdcli.app import render
        from sdcli.loading.lora import LoraState

        key = (model or self.current[0], self.current[1] if vae == "current" else vae)
        if key != self.loaded:
            self.models = self.lora_state = self.loaded = None  # one model in memory at a time
            _collect()
            cfg = dataclasses.replace(self.base, model=key[0], vae=key[1])
            models = render.load(cfg)
            self.lora_state = LoraState(models, keep_originals=True)  # requests switch LoRA sets
            self.models, self.loaded, self.placement = models, key, models.placement
            self._hash(models, key[0])
        return self.models

    def _hash(self, models, path: str) -> None:
        from sdcli.app.save import model_hash

        digest = model_hash(models)  # read once here: every image records it, as a local run's does
        if digest:
            self.hashes[self.name_of(path)] = digest

    def switch(self, model: str | None, vae: str | None = "current") -> None:
        """POST /options: the checkpoint (and VAE) every later request gets, loaded now; one that fails to load
        leaves the current choice as it was."""
        choice = (model or self.current[0], self.current[1] if vae == "current" else vae)
        self.ensure(*choice)
        self.current = choice

    def render(self, ticket: Ticket, spec: RenderSpec) -> Result:
        """The spec's images, batch by batch, through render.render_batch; interrupted: the ones finished."""
        from sdcli import pipeline
        from sdcli.app import render
        from sdcli.app.img2img import prepare_init

        models = self.ensure(spec.model, spec.vae)
        ticket.latent = models.family.latent
        cfg = dataclasses.replace(spec.job.cfg, model=self.loaded[0], vae=self.loaded[1])  # recorded by name
        job = dataclasses.replace(spec.job, cfg=cfg)
        init = None
        if spec.init is not None:
            init, _ = prepare_init(cfg, spec.init.image, spec.init.mask, spec.init.notes, spec.init.mask_name,
                                   models)
        else:
            render.check_inpaint_model(models, cfg, None)
        self._use_loras(spec.loras)
        targets = [render.Target(job, index, seed, Path(f"{index}.png"), None, subseed)
                   for index, seed, subseed in zip(spec.indices, spec.seeds, spec.subseeds)]
        result = Result([], model=self.describe(models), started=time.time())
        prepared = render.prepare(models, cfg, job, init)
        batches = [targets[i:i + cfg.batch_size] for i in range(0, len(targets), cfg.batch_size)]
        ticket.batches = len(batches)
        hooks = _Hooks(ticket.on_step)
        try:
            with pipeline.seamless(models, cfg.seamless):
                for ticket.batch, batch in enumerate(batches):
                    ticket.check()
                    result.images += self._batch(ticket, models, prepared, batch, init, hooks)
        except Stopped:
            if ticket.cancelled.is_set():
                raise
            result.interrupted = True
        result.finished = time.time()
        log(f"{ticket.name}: {len(result.images)} image{'s' if len(result.images) != 1 else ''} in "
            f"{result.finished - result.started:.1f} s{' (interrupted)' if result.interrupted else ''}")
        return result

    def _batch(self, ticket: Ticket, models, prepared, batch: list, init, hooks) -> list:
        from sdcli.app import render

        ticket.step = ticket.steps = 0
        try:
            done = render.render_batch(models, prepared, batch, init, hooks, tuple(self.lora_state.reports))
        except Skipped:
            return []
        for image in done:
            ticket.emit({"event": "image", "rendered": image})
        return done

    def _use_loras(self, specs: list) -> None:
        from sdcli.app import render

        try:
            render.use_loras(self.lora_state, specs)
        except BaseException:
            self.loaded = None  # a merge that stopped half-way leaves weights no other job may use: reload
            raise

    def describe(self, models) -> dict:
        """The loaded checkpoint as A1111 names it in `info` and /options."""
        from sdcli.app.save import vae_hash

        digest = self.hashes.get(self.name_of(self.loaded[0]))
        vae = models.vae_source
        return {"name": models.name, "hash": digest[:10] if digest else None, "sha256": digest,
                "vae_name": vae.name if vae is not None else None,
                "vae_hash": (vae_hash(models) or "")[:10] or None if vae is not None else None}

    def name_of(self, path: str) -> str:
        """A checkpoint's name among Folders.models() (its file name when it is not there)."""
        return next((n for n, p in self.folders.models().items() if p == path), Path(path).name)

    def titles(self) -> dict[str, str]:
        """A1111's checkpoint titles: "name [shorthash]" once the hash is known, else the name."""
        return {name: f"{name} [{self.hashes[name][:10]}]" if name in self.hashes else name
                for name in self.folders.models()}


@dataclass(frozen=True)
class _Hooks:
    """What render.render_batch reads from a request: no bar, no preview file; the ticket's step hook."""

    on_step: Callable
    progress: str = "none"
    preview: Any = None
    preview_vae: Any = None


def _collect() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def status_of(e: BaseException) -> int:
    """The HTTP status of an error: bad input 422 (A1111's validation status), a missing file 404 (as A1111's
    "Model not found"), an interrupted job 200 (handled before), anything else 500."""
    if isinstance(e, ModelNotFoundError):
        return 404
    if isinstance(e, (UsageError, BadInputError)) or getattr(e, "exit_code", None) in (2, 3, 8):
        return 422
    return 500


def log(message: str) -> None:
    console.info(f"serve: {message}")

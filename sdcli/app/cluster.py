"""`--ray ADDRESS`: a run's images rendered by model replicas on a Ray cluster, written by this process.

The driver (this process) keeps the plan: the jobs were read and checked, the output names and seeds planned and
the LoRA files sniffed before anything starts here. Each worker is a Ray actor that loads the model once and
renders the UNet batches sent to it with the local path's own function (render.render_batch), so a PNG comes back
as the very bytes a local run on the same device and dtype would write; the driver writes it atomically
(save.write_png), so no shared file system is needed.

Faults are Ray's business: a worker that dies is restarted by Ray (max_restarts) and the batches it held are
retried on it (max_task_retries), on whatever node Ray places it. Only a worker that is gone for good (restarts
used up) has its batches handed back here, to the next free worker. Each batch's result arrives once and each
image is written once, by name, with the no-clobber publish of output/targets.py. A batch that fails for its own reasons
(a LoRA that fits nothing, NaNs) is reported with its prompts-file line; the others go on, and the run then ends
with an error listing the failures.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from sdcli.runtime import console
from sdcli.runtime.extras import install_hint
from sdcli.runtime.errors import SdcliError, UsageError
from sdcli.app import render, save

INSTALL = install_hint("ray")
ACTOR_RESTARTS = 3  # per worker: a job that kills its worker every time must not loop forever
IN_FLIGHT = 2  # batches queued per worker: the next one is there when the current one ends
NAME_PREFIX = "sdcli-worker"


@dataclass(frozen=True)
class Workers:
    """--workers / --gpus-per-worker / --cpus-per-worker; None = decided from the cluster's resources."""

    count: int | None = None
    gpus: float | None = None
    cpus: float = 1.0


class JobsFailed(SdcliError):
    """Some images of a --ray run failed for their own reasons; the rest were written."""

    def __init__(self, failures: list[dict], total: int):
        lines = "; ".join(f"{f['source']} (image {f['index']}): {f['message']}" for f in failures)
        super().__init__(f"{len(failures)} of {total} images failed: {lines}")
        codes = {f["exit_code"] for f in failures}
        self.exit_code = codes.pop() if len(codes) == 1 else 1


def import_ray():
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, an optional extra: {INSTALL}") from None
    return ray


def check_request(req, targets: list) -> None:
    """What a worker cannot do for the driver, refused before anything starts."""
    refused = {"--cond": getattr(req, "cond", None), "--latent-in": getattr(req, "latent_in", None),
               "--latent-out": getattr(req, "latent_out", None), "--preview": getattr(req, "preview", None),
               "--grid": getattr(req, "grid", None)}
    for flag, value in refused.items():
        if value:
            raise UsageError(f"{flag} cannot be used with --ray (the workers render prompts only)")
    if any(str(t.path) == "-" for t in targets):
        raise UsageError("-o - cannot be used with --ray: give an output file or template")


# --- the driver ----------------------------------------------------------------------------------------------

def render_on_ray(address: str, workers: Workers, base, targets: list, loras: dict, req, setup=None) -> None:
    """Render `targets` on the Ray cluster at `address` (auto | local | ray://host:port); `setup(models)` gives a
    worker its (init, cond) once its model is loaded (img2img's encoded image); None: text to image."""
    check_request(req, targets)
    ray = import_ray()
    started_here = _connect(ray, address)
    actors: list = []
    try:
        actors = _start_workers(ray, workers, base, targets, loras, setup)
        _load_all(ray, actors)
        failures = _stream(ray, actors, _batches(targets), targets, req)
    finally:  # Ctrl-C included: the workers stop, the images already written stay
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started_here:
            ray.shutdown()
    if failures:
        raise JobsFailed(failures, len(targets))


def _connect(ray, address: str) -> bool:
    """Join (or, for `local`, start) the cluster; True when this call did, so the run ends it again."""
    if ray.is_initialized():  # a program (or test) that drives sdcli in-process and brought its own Ray
        return False
    if address not in ("auto", "local") and ":" not in address:
        raise UsageError(f"--ray: expected auto, local or ray://HOST:PORT, got {address!r}")
    try:
        ray.init(address=address, log_to_driver=False, logging_level="error", include_dashboard=False)
    except ConnectionError as e:
        raise UsageError(f"--ray {address}: no Ray cluster found ({e}); start one with `ray start --head` "
                         "or use --ray local") from None
    return True


def _start_workers(ray, workers: Workers, base, targets: list, loras: dict, setup) -> list:
    count, gpus = _worker_count(ray, workers)
    jobs = list({id(t.job): t.job for t in targets}.values())  # numbered in order, as _batches numbers them
    specs = [[_absolute(s) for s in loras[id(job)]] for job in jobs]
    base = _absolute_model(base)
    actor = ray.remote(Worker)
    run = f"{os.getpid()}-{int(time.time())}"
    console.info(f"ray: {count} worker{'s' if count != 1 else ''} ({workers.cpus:g} CPU, {gpus:g} GPU each)")
    # Ray restarts a dead worker (max_restarts) and re-sends it the batches it held (max_task_retries=-1: as
    # long as it has restarts left); the name lets an operator (or a test) find one.
    return [actor.options(name=f"{NAME_PREFIX}-{run}-{k}", num_cpus=workers.cpus, num_gpus=gpus,
                          max_restarts=ACTOR_RESTARTS, max_task_retries=-1)
            .remote(f"w{k}", base, specs, setup, workers.cpus) for k in range(count)]


def _worker_count(ray, workers: Workers) -> tuple[int, float]:
    """(workers, GPUs each): by default one per GPU, or one per machine when the cluster has none."""
    have = ray.cluster_resources()
    gpus = workers.gpus if workers.gpus is not None else (1.0 if have.get("GPU", 0) >= 1 else 0.0)
    if workers.count is not None:
        count = workers.count
    elif gpus > 0:
        count = max(1, int(have.get("GPU", 0) // gpus))
    else:
        count = max(1, sum(1 for node in ray.nodes() if node.get("Alive")))
    for name, each in (("CPU", workers.cpus), ("GPU", gpus)):
        if count * each > have.get(name, 0) + 1e-9:
            raise UsageError(f"--ray: {count} workers x {each:g} {name} do not fit the cluster "
                             f"({have.get(name, 0):g} {name}); pass fewer --workers or less per worker")
    return count, gpus


def _absolute(spec):
    import dataclasses

    return dataclasses.replace(spec, path=spec.path.resolve())


def _absolute_model(base):
    """A model path relative to this folder means nothing in a worker's: made absolute (hub ids stay)."""
    import dataclasses
    from pathlib import Path

    fixed = {k: str(Path(v).resolve()) for k in ("model", "vae") if (v := getattr(base, k)) and Path(v).exists()}
    return dataclasses.replace(base, **fixed)


def _load_all(ray, actors: list) -> None:
    """Every worker loads its model before the first batch: a model a node cannot read fails the run here."""
    for error in ray.get([a.load.remote() for a in actors]):
        if error is not None:
            raise _rebuilt(error)


def _rebuilt(error: dict) -> SdcliError:
    e = SdcliError(error["message"])
    e.exit_code = error["exit_code"]
    return e


def _batches(targets: list) -> list[tuple[int, list]]:
    """(job number, targets) per UNet batch: a job's images in --batch-size groups, as render_all makes them."""
    jobs: dict[int, int] = {}
    by_job: dict[int, list] = {}
    for t in targets:
        jobs.setdefault(id(t.job), len(jobs))
        by_job.setdefault(id(t.job), []).append(t)
    out = []
    for key, group in by_job.items():
        size = group[0].job.cfg.batch_size
        out += [(jobs[key], group[i:i + size]) for i in range(0, len(group), size)]
    return out


def _stream(ray, actors: list, batches: list, targets: list, req) -> list[dict]:
    """Feed the batches to the workers, IN_FLIGHT each, writing every image as it arrives; the failures."""
    from ray.exceptions import RayActorError

    by_index = {t.index: t for t in targets}
    queue, running, failures, written = list(batches), {}, [], set()
    live = list(actors)
    with BatchProgress(len(targets), req.progress) as progress:
        while queue or running:
            _fill(queue, running, live)
            if not running:
                raise SdcliError(f"every Ray worker died; {len(queue)} batches were not rendered "
                                 "(rerun the same command with --skip-existing)")
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor, batch = running.pop(ref)
            try:
                results = ray.get(ref)
            except RayActorError as e:  # restarts used up: this worker is gone, its batch goes to another
                console.info(f"ray: a worker is gone ({type(e).__name__}); its batch goes to another")
                live = [a for a in live if a is not actor]
                queue.insert(0, batch)
                continue
            for r in results:
                _finish(r, by_index[r["index"]], req, written, failures, progress)
    return failures


def _fill(queue: list, running: dict, live: list) -> None:
    for actor in live:
        while queue and sum(1 for a, _ in running.values() if a is actor) < IN_FLIGHT:
            batch = queue.pop(0)
            running[actor.render.remote(*batch)] = (actor, batch)


def _finish(result: dict, target, req, written: set, failures: list, progress) -> None:
    if result["index"] in written:  # cannot happen (one result per batch); never write an image twice
        return
    written.add(result["index"])
    if "error" in result:
        failure = {"index": target.index, "source": target.job.source, **result["error"]}
        failures.append(failure)
        console.error(f"{failure['source']} (image {target.index}, seed {target.seed}): {failure['message']}")
        progress.advance(target, None, result, failed=True)
        return
    path = save.write_png(target, result["png"], req)
    save.announce(req, target, path, result["timings"], result["fallbacks"], worker=result["worker"])
    progress.advance(target, path, result)


class BatchProgress:
    """The whole run: a rich bar (images done / total, rate, ETA) on a terminal, or with --progress json one
    {"event": "image", ...} line per image naming its worker."""

    def __init__(self, total: int, mode: str):
        self.total, self.mode, self.done, self.bar = total, mode, 0, None
        self.t0 = time.perf_counter()

    def __enter__(self):
        if self.mode == "auto" and not console.is_quiet() and console.stderr().is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn("images"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                TimeElapsedColumn(), TimeRemainingColumn(), console=console.stderr())
            self.bar.start()
            self.task = self.bar.add_task("images", total=self.total, rate="")
        return self

    def advance(self, target, path, result: dict, failed: bool = False) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.t0
        if self.mode == "json":
            console.emit_event({"event": "image", "index": target.index, "seed": target.seed,
                                "path": str(path) if path else None, "worker": result["worker"],
                                "pid": result["pid"], "failed": failed,
                                "done": self.done, "total": self.total, "elapsed_s": round(elapsed, 3)})
        elif self.bar is not None:
            self.bar.update(self.task, completed=self.done, rate=f"{60 * self.done / max(elapsed, 1e-9):.1f} img/min")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the worker (a Ray actor) --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Quiet:
    """What render.render_batch reads from a request: no per-step progress and no preview on a worker."""

    progress: str = "none"
    preview: Any = None


class Worker:
    """One model replica. Ray re-runs __init__ after a restart; the model is (re)loaded on first use."""

    def __init__(self, name: str, base, specs: list[list], setup, cpus: float):
        import torch

        console.set_quiet(True)  # the driver reports; a worker's stderr goes to Ray's logs
        torch.set_num_threads(max(1, int(cpus)))
        self.name, self.base, self.specs, self.setup = name, base, specs, setup
        self.models = None

    def load(self) -> dict | None:
        try:
            self._ensure_loaded()
        except SdcliError as e:
            return {"message": str(e), "exit_code": e.exit_code}
        return None

    def render(self, job_number: int, batch: list) -> list[dict]:
        """One UNet batch of job `job_number`: for each image its PNG bytes, or the error that stopped it."""
        from sdcli.pipeline import seamless

        self._ensure_loaded()
        job = batch[0].job
        try:
            self._use_loras(self.specs[job_number])
            if self.prepared[0] != job_number:
                self.prepared = (job_number, render.prepare(self.models, job.cfg, job, self.init, self.cond))
            with seamless(self.models, job.cfg.seamless):
                done = render.render_batch(self.models, self.prepared[1], batch, self.init, _Quiet(),
                                           tuple(self.lora_state.reports))
        except Exception as e:  # noqa: BLE001 - this job's own failure: reported with its line, the rest go on
            error = {"message": str(e) or type(e).__name__, "exit_code": getattr(e, "exit_code", 1)}
            return [{"index": t.index, "worker": self.name, "pid": os.getpid(), "error": error} for t in batch]
        return [{"index": d.target.index, "png": d.png, "timings": d.timings, "fallbacks": d.fallbacks,
                 "worker": self.name, "pid": os.getpid()} for d in done]

    def _ensure_loaded(self) -> None:
        from sdcli.loading.lora import LoraState

        if self.models is not None:
            return
        self.models = render.load(self.base)
        self.init, self.cond = self.setup(self.models) if self.setup else _txt2img_setup(self.base, self.models)
        switching = len({tuple((s.path, s.weight) for s in specs) for specs in self.specs}) > 1
        self.lora_state = LoraState(self.models, keep_originals=switching)
        self.prepared = (None, None)

    def _use_loras(self, specs: list) -> None:
        try:
            render.use_loras(self.lora_state, specs)
        except BaseException:
            self.models = None  # a merge that stopped half-way leaves weights no other job may use: reload
            raise


def _txt2img_setup(base, models):
    render.check_model_options(models, base, None)
    return None, None


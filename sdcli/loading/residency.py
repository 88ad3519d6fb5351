"""Which parts of a loaded checkpoint ("text", "unet", "vae") are in memory, and where: built when first asked for,
released or moved between stages by a policy, rebuilt when asked for again.

Policies (SDCLI_RESIDENCY overrides the choice; README "Memory"):
- keep: every part built at load and never released. The default on CUDA/MPS.
- lean: the default on a CPU. A part is built when first needed; the text encoders are released when sampling
  starts (their conditioning is computed by then); the VAE is built at the first decode or encode and kept; the
  UNet is released when the run says no sampling is left (`done_sampling`), before the last decode.
- offload (--offload): one stage's part at a time. On a CPU the others are released (and rebuilt when their stage
  comes back); on CUDA/MPS every part lives in CPU RAM and moves to the accelerator only while its stage runs.

Three stages announce themselves (`stage`): pipeline.encode_text ("text"), pipeline._sample ("unet"),
pipeline.encode_image / decode_latents ("vae"). What changes a module in place while rendering (lora.LoraState's
merges, pipeline.seamless's padding) watches the residency (`watch`): it is told when a part is built, so a rebuilt
part gets the same changes, and when one is released, so it lets the modules go. A rebuild reads the same files
again: one that changed on disk since the load is refused (exit 3), never mixed in.

Parts sharing a run (an SDXL refiner beside its base) `join` one group: a stage of one releases or moves the
others' parts as it would its own.
"""

from __future__ import annotations

import collections
import gc
import os
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

from sdcli.runtime.device import trim_heap
from sdcli.runtime.errors import BadInputError, UsageError

PARTS = ("text", "unet", "vae")
POLICIES = ("keep", "lean", "offload")
POLICY_ENV = "SDCLI_RESIDENCY"


def choose(offload: bool, device: str, lazy: bool = False) -> str:
    """The policy of a run: SDCLI_RESIDENCY when set, else offload when asked for, else lean on a CPU (or for a
    command that uses one part, `lazy`), else keep."""
    forced = os.environ.get(POLICY_ENV, "").strip()
    if forced:
        if forced not in POLICIES:
            raise UsageError(f"{POLICY_ENV}={forced!r}: use one of {', '.join(POLICIES)} or leave it unset")
        return forced
    if offload:
        return "offload"
    return "lean" if lazy or torch.device(device).type == "cpu" else "keep"


def home_of(policy: str, device: torch.device) -> torch.device:
    """Where idle parts live: CPU RAM under offload on an accelerator, else the run's device."""
    return torch.device("cpu") if policy == "offload" and device.type != "cpu" else device


def stamps(paths) -> dict[str, tuple[int, ...]]:
    """(size, mtime_ns, inode, ctime_ns) of each file: what a rebuild compares to see that nothing changed since
    the load. The inode tells a file replaced by another (a rename over it); ctime, which no program can set
    back, tells a file rewritten in place with its size and mtime put back."""
    out = {}
    for path in paths:
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            st = f.stat()
            out[str(f)] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    return out


class Residency:
    """The parts of one checkpoint. `builders[part]()` reads a part from the files (a module, or a tuple of
    modules for "text"); `skeletons[part]()` builds it on the meta device (names and shapes, no weights)."""

    def __init__(self, builders: dict[str, Callable[[], Any]], skeletons: dict[str, Callable[[], Any]],
                 policy: str, device: torch.device, dtype: torch.dtype, files: dict[str, tuple[int, int]]):
        if policy not in POLICIES:
            raise ValueError(f"unknown residency policy {policy!r}")
        self.builders, self.skeletons, self.policy = builders, skeletons, policy
        self.device, self.dtype, self.files = device, dtype, files
        self.home = home_of(policy, device)
        self.parts: dict[str, Any] = {}
        self.where: dict[str, torch.device] = {}
        self.watchers: dict[str, Any] = {}
        self.companions: dict[str, weakref.WeakSet] = collections.defaultdict(weakref.WeakSet)
        self.group: list[Residency] = [self]
        self.events: collections.deque = collections.deque(maxlen=1000)  # ("build"|"release"|"move", part)
        self._skeletons: dict[str, Any] = {}
        self.loaded = False  # set once the load returns: later builds check the files first
        self.running: str | None = None  # the part of the stage that started last

    @classmethod
    def holding(cls, parts: dict[str, Any], device: str | torch.device = "cpu") -> Residency:
        """Modules built elsewhere, held under keep (nothing to read again): for tests and tools."""
        device = torch.device(device)
        held = cls({}, {}, "keep", device, torch.float32, {})
        held.parts = dict(parts)
        held.where = {part: device for part in parts}
        held.loaded = True
        return held

    # --- what callers ask -------------------------------------------------------------------------

    def get(self, part: str):
        """The part, built (or rebuilt) when it is not in memory; under offload on a CPU, building it releases
        the others first."""
        if part not in self.parts:
            if self.policy == "offload" and self.device.type == "cpu":
                self._release_others(part)
            self._build(part)
        return self.parts[part]

    def stage(self, part: str):
        """A stage that runs `part` starts: the policy releases or moves what it does not need; the part comes
        back ready on the run's device."""
        if self.policy == "lean" and part == "unet":
            for member in self.group:
                member.release("text")  # the conditioning is computed: the encoders have done their work
        if self.policy == "offload":
            self._release_others(part)
        if part != self.running and self.device.type == "cpu":
            trim_heap()  # glibc keeps the last stage's freed working set (~0.35 GB after 512px UNet steps)
        self.running = part
        value = self.get(part)
        self._place(part, self.device)
        return value

    def done_sampling(self) -> None:
        """No sampling is left in this run: lean lets the UNets of the group go before the last decode."""
        if self.policy == "lean":
            for member in self.group:
                member.release("unet")

    def release(self, part: str) -> None:
        """Let the part go (a later `get` rebuilds it); glibc is asked to hand the freed heap back."""
        value = self.parts.pop(part, None)
        if value is None:
            return
        self.where.pop(part, None)
        for watcher in list(self.watchers.values()):
            watcher.released(part, _modules(value))
        if part == "unet":
            from sdcli.runtime import cuda_graphs

            cuda_graphs.forget(value)  # its captured graphs hold the module (and their memory)
        gone = [weakref.ref(m) for m in _modules(value)]
        del value
        if any(ref() is not None for ref in gone):  # held by a cycle: a full collection (~0.15 s) lets it go
            gc.collect()
        trim_heap()
        self.events.append(("release", part))

    def resident(self) -> dict[str, str]:
        """part -> device type ("cpu", "cuda") of each part in memory."""
        return {part: self.where[part].type for part in PARTS if part in self.parts}

    def peek(self, part: str):
        """The part when it is in memory, else None (never builds)."""
        return self.parts.get(part)

    def skeleton(self, part: str):
        """The part built on the meta device: module names and shapes without weights (LoRA name matching)."""
        if part in self.parts:
            return self.parts[part]
        if part not in self._skeletons:
            self._skeletons[part] = self.skeletons[part]()
        return self._skeletons[part]

    def watch(self, name: str, watcher) -> None:
        """`watcher.built(part, modules)` now for every part in memory and whenever one is built;
        `watcher.released(part, modules)` when one is let go. One watcher per name: a new one replaces it."""
        self.watchers[name] = watcher
        for part, value in list(self.parts.items()):
            watcher.built(part, _modules(value))

    def unwatch(self, name: str) -> None:
        self.watchers.pop(name, None)

    def attach(self, part: str, module: torch.nn.Module) -> None:
        """A module that runs with `part` (a ControlNet with the UNet): it moves with it between devices."""
        self.companions[part].add(module)
        if part in self.where:
            _to(module, self.where[part])

    def join(self, other: Residency) -> None:
        """One group with `other` (the refiner beside its base): stages of one act on the parts of all."""
        group = other.group
        for member in self.group:
            if member not in group:
                group.append(member)
            member.group = group

    # --- the work ---------------------------------------------------------------------------------

    def _build(self, part: str) -> None:
        if self.loaded:  # checked before and after the read: a file swapped while it was read is not used
            self._check_files()
            try:
                value = self.builders[part]()
            except (OSError, BadInputError) as e:  # a file cut, removed or swapped while it was read: say that
                self._check_files()
                if isinstance(e, BadInputError):
                    raise
                raise BadInputError(f"{getattr(e, 'filename', None) or 'a model file'}: cannot be read again "
                                    f"({e.strerror or e}); run the command again") from None
            self._check_files()
        else:
            value = self.builders[part]()
        self.parts[part], self.where[part] = value, self.home
        for module in self.companions[part]:
            _to(module, self.home)
        self.events.append(("build", part))
        try:
            for watcher in list(self.watchers.values()):
                watcher.built(part, _modules(value))
        except BaseException:  # a merge that stopped half-way: no later stage may run these weights
            self.release(part)
            raise

    def _release_others(self, part: str) -> None:
        """Offload: every other part of the group released (on a CPU) or sent home to CPU RAM."""
        for member in self.group:
            for other in PARTS:
                if (member, other) == (self, part) or other not in member.parts:
                    continue
                if member.device.type == "cpu":
                    member.release(other)
                else:
                    member._place(other, member.home)

    def _place(self, part: str, device: torch.device) -> None:
        """The one place a part (and what rides with it) moves between devices."""
        if self.where.get(part) == device:
            return
        for module in (*_modules(self.parts[part]), *self.companions[part]):
            _to(module, device)
        if part == "unet":
            from sdcli.runtime import cuda_graphs

            cuda_graphs.forget(self.parts[part])  # graphs hold the weights' old addresses
        leaving = self.where.get(part)
        self.where[part] = device
        self.events.append(("move", part))
        if leaving is not None and leaving.type == "cuda":
            torch.cuda.empty_cache()  # the next stage's part gets the memory this one held

    def _check_files(self) -> None:
        """A rebuild reads the files of the load; one rewritten since would mix two models' weights."""
        try:
            now = stamps([Path(p) for p in self.files if Path(p).exists()])
        except OSError:  # a file went away while it was looked at
            now = {}
        for path, stamp in self.files.items():
            if path not in now:
                raise BadInputError(f"{path}: removed since it was loaded (a part had to be read again); run the "
                                    "command again")
            if now[path] != stamp:
                raise BadInputError(f"{path}: changed on disk since it was loaded; run the command again")


def _modules(value) -> tuple:
    """The modules a part holds (an optional text encoder that is absent, None, is no module)."""
    return tuple(v for v in value if v is not None) if isinstance(value, (tuple, list)) else (value,)


def _to(module: torch.nn.Module, device: torch.device) -> None:
    module.to(device)

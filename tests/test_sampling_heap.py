"""The sampling heap (runtime/device.py `sampling_heap`): glibc's mmap and trim thresholds are raised only while a
CPU samples, after the part is built, and pinned again (with the heap trimmed) when sampling ends, even by an
exception; every part is built under the pinned thresholds (the load peaks of fix_heap_threshold's docstring).
Checked through the real pipeline with a recording stand-in for glibc, and on glibc itself: a block freed while
held comes back without page faults. Allocation never changes bits; test_residency.py's byte comparisons and
tests/test_refactor_bytes.py run with the hold on (the default)."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import pytest
import torch

from _fixtures_dit import dit_components, dit_dir, tiny_flux  # noqa: F401
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from sdcli import pipeline
from sdcli.loading.checkpoint import load_models
from sdcli.loading.residency import Residency
from sdcli.runtime import device

pytestmark = pytest.mark.usefixtures("one_thread")

PINNED = {device.M_MMAP_THRESHOLD: device.MMAP_THRESHOLD, device.M_TRIM_THRESHOLD: device.TRIM_THRESHOLD}
HELD = {device.M_MMAP_THRESHOLD: device.SAMPLING_THRESHOLD, device.M_TRIM_THRESHOLD: device.SAMPLING_THRESHOLD}


class RecordingGlibc:
    """mallopt and malloc_trim as glibc answers them, remembering the thresholds and every call."""

    def __init__(self):
        self.thresholds: dict[int, int] = {}
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.thresholds[param] = value
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = RecordingGlibc()
    monkeypatch.setattr(device, "_glibc", lambda: fake)
    monkeypatch.delenv(device.HOLD_ENV, raising=False)
    device.fix_heap_threshold()  # as device.configure does before a render
    return fake


def _watch(monkeypatch, libc):
    """What the thresholds were at every part build and every UNet call."""
    seen = []
    build, call = Residency._build, pipeline._UNetAdapter.__call__

    def building(self, part):
        seen.append(("build " + part, dict(libc.thresholds)))
        return build(self, part)

    def calling(self, *args, **kwargs):
        seen.append(("unet call", dict(libc.thresholds)))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(Residency, "_build", building)
    monkeypatch.setattr(pipeline._UNetAdapter, "__call__", calling)
    return seen


def _render(models, callback=None):
    plan = pipeline.make_plan("euler", "auto", 2, cfg=5.0, family=models.family)
    cond, uncond = pipeline.encode_text(models, "a fox", "")
    latents = pipeline.txt2img(models, plan, cond, uncond, [1], 64, 64, callback=callback)
    models.parts.done_sampling()
    return pipeline.decode_latents(models, latents)


def test_held_only_while_sampling_and_every_build_pinned(libc, tiny_sd1, monkeypatch):  # noqa: F811
    seen = _watch(monkeypatch, libc)
    _render(load_models(tiny_sd1, residency="lean"))
    assert [what for what, _ in seen] == ["build text", "build unet"] + ["unet call"] * 2 + ["build vae"]
    for what, thresholds in seen:
        assert thresholds == (HELD if what == "unet call" else PINNED), what
    end = libc.calls.index(("mallopt", device.M_MMAP_THRESHOLD, device.MMAP_THRESHOLD), 3)  # after the hold
    assert libc.calls[end:end + 3] == [("mallopt", device.M_MMAP_THRESHOLD, device.MMAP_THRESHOLD),
                                       ("mallopt", device.M_TRIM_THRESHOLD, device.TRIM_THRESHOLD), ("trim", 0)]
    assert libc.thresholds == PINNED


def test_an_interrupted_sampling_pins_the_thresholds_again(libc, tiny_sd1):  # noqa: F811
    class Stop(Exception):
        pass

    def stop(i, total, x, denoised):
        assert libc.thresholds == HELD
        raise Stop

    with pytest.raises(Stop):
        _render(load_models(tiny_sd1, residency="lean"), callback=stop)
    assert libc.thresholds == PINNED and libc.calls[-1] == ("trim", 0)


def test_switched_off_the_thresholds_stay_pinned(libc, tiny_sd1, monkeypatch):  # noqa: F811
    monkeypatch.setenv(device.HOLD_ENV, "0")
    seen = _watch(monkeypatch, libc)
    _render(load_models(tiny_sd1, residency="keep"))
    assert seen and all(thresholds == PINNED for _, thresholds in seen)
    assert all(call[0] != "mallopt" or call[2] != device.SAMPLING_THRESHOLD for call in libc.calls)


def test_a_gguf_denoiser_keeps_the_pinned_thresholds(libc, tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    """Quantized weights are a choice of memory over speed: the held heap's fragments (+0.25 GiB beside a
    full-size FLUX.1 Q4_K block at 1024 px) are not taken then."""
    from safetensors.torch import load_file

    from sdcli.quant.quantize import write_gguf

    gguf = tmp_path / "sd1-q8_0.gguf"
    write_gguf(gguf, load_file(tiny_sd1), "q8_0")
    seen = _watch(monkeypatch, libc)
    models = load_models(gguf, residency="keep")
    trims = _trims_per_call(monkeypatch, libc)
    _render(models)
    assert ("unet call", PINNED) in seen and all(thresholds == PINNED for _, thresholds in seen)
    assert trims == [0, 0]  # a UNet's blocks leave little behind: not trimmed (pipeline._sample says why)
    unet = models.stage("unet")
    names = {id(m): name for name, m in unet.named_modules()}
    assert {names[id(b)].rsplit(".", 1)[0] for b in pipeline._blocks(unet)} == \
        {"input_blocks", "middle_block", "output_blocks"}  # outermost lists only, not the transformer blocks inside


def test_offload_samples_on_a_pinned_heap_trimmed_after_each_block(libc, tiny_sd1, monkeypatch):  # noqa: F811
    """--offload chose memory: an SDXL 1024 px UNet call grew the held heap by 0.5 GB over a ~0.3 GB live set, so
    the thresholds stay pinned and the heap is trimmed after each of the UNet's blocks (pipeline._sample)."""
    seen = _watch(monkeypatch, libc)
    models = load_models(tiny_sd1, residency="offload")
    trims = _trims_per_call(monkeypatch, libc)
    _render(models)
    assert [t for what, t in seen if what == "unet call"] == [PINNED] * 2
    unet = models.stage("unet")  # offload let the sampled one go: a rebuilt one, the same structure
    assert trims == [len(pipeline._blocks(unet))] * 2
    assert len(pipeline._blocks(unet)) == len(unet.input_blocks) + len(unet.middle_block) + len(unet.output_blocks)


def _trims_per_call(monkeypatch, libc) -> list[int]:
    """The malloc_trim calls made inside each denoiser call, filled as the calls happen."""
    trims, call = [], pipeline._UNetAdapter.__call__

    def counting(self, *args, **kwargs):
        before = libc.calls.count(("trim", 0))
        out = call(self, *args, **kwargs)
        trims.append(libc.calls.count(("trim", 0)) - before)
        return out

    monkeypatch.setattr(pipeline._UNetAdapter, "__call__", counting)
    return trims


def test_a_gguf_dit_has_its_heap_trimmed_after_each_block(libc, tiny_flux, dit_components, tmp_path,
                                                           monkeypatch):  # noqa: F811
    """A DiT block's activations (0.3-0.4 GiB for FLUX.1 at 1024 px) left up to 0.24 GiB of fragments under the
    next block's peak: a GGUF DiT's heap is trimmed after each double and single block."""
    from safetensors.torch import load_file

    from sdcli.quant.quantize import write_gguf

    gguf = tmp_path / "flux-q8_0.gguf"
    write_gguf(gguf, load_file(tiny_flux), "q8_0", arch="flux")
    models = load_models(gguf, dit_components["vae"], residency="keep",
                         text_files={"clip_l": dit_components["clip_l"], "t5": dit_components["t5"]})  # fmt: skip
    trims = _trims_per_call(monkeypatch, libc)
    plan = pipeline.make_plan("euler", "auto", 2, family=models.family)
    cond, _ = pipeline.encode_text(models, "a fox", None)
    cond = pipeline.with_guidance(models, pipeline.with_size_vector(models, cond, None))  # as bench_gguf's DiT worker
    pipeline.txt2img(models, plan, cond, None, [1], 64, 64)
    dit = models.stage("unet")
    assert libc.thresholds == PINNED
    assert trims == [len(dit.double_blocks) + len(dit.single_blocks)] * 2
    assert not any(m._forward_hooks for m in dit.modules())  # the hooks go when sampling ends


def test_trimming_after_blocks_keeps_their_outputs(libc):
    """A forward hook that returned malloc_trim's int would replace the block's output."""
    blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    x = torch.randn(2, 4)
    want = blocks[1](blocks[0](x))
    with device.sampling_heap(torch.device("cpu"), hold=False, blocks=list(blocks)):
        got = blocks[1](blocks[0](x))
        assert libc.thresholds == PINNED
    assert torch.equal(got, want) and libc.calls.count(("trim", 0)) == 2


def test_not_held_off_the_cpu(libc):
    with device.sampling_heap(torch.device("meta")):
        assert libc.thresholds == PINNED
    assert ("trim", 0) not in libc.calls


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap thresholds only")
def test_on_glibc_a_block_freed_while_held_comes_back_without_page_faults():
    """64 MB, above the pinned 32 MB threshold: pinned, each one is a fresh mapping (16k faults to fill)."""
    pages = (64 << 20) // resource.getpagesize()

    def faults_to_fill():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(pages * resource.getpagesize(), dtype=torch.uint8)
        block.fill_(1)
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert device.fix_heap_threshold()
    with device.sampling_heap(torch.device("cpu")):
        held = [faults_to_fill() for _ in range(4)]
    assert held[-1] < pages // 20, held  # the same pages again (the first fill faults them in)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's heap only")
def test_on_glibc_a_freed_storage_gives_its_pages_back():
    """A 16 MB block (under the 32 MB threshold: heap, not a mapping of its own) freed with free_storage leaves the
    process's resident memory; freed plainly, glibc keeps it resident as a hole the heap may not trim."""
    def resident() -> int:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()

    assert device.fix_heap_threshold()
    keep = torch.ones(1 << 20)  # a live block after it, so the freed one is not the heap's top
    block = torch.ones(16 << 20, dtype=torch.uint8)
    after = torch.ones(1 << 20)
    before = resident()
    device.free_storage(block)
    assert block.untyped_storage().nbytes() == 0
    assert before - resident() > (15 << 20)
    del keep, after

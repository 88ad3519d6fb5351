"""`--dtype auto` and replayed dtypes on every kind of machine sdcli meets, simulated: the CPU's flags (AVX2 only,
AVX512-BF16, AMX, ARM, no /proc/cpuinfo as on macOS), CUDA present or not, MPS, and the SDCLI_CPU_BF16 override.
Nothing here depends on the processor that runs the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdcli.runtime import device
from sdcli.runtime.errors import UsageError

ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma bmi2\n"
ZEN5 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
AMX_ONLY = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n"
CPUS = {"zen3": (ZEN3, False), "zen5": (ZEN5, True), "sapphire-rapids": (SAPPHIRE_RAPIDS, True),
        "amx-only": (AMX_ONLY, True), "arm": (GRAVITON3, False), "macos": (None, False)}


@pytest.fixture
def machine(monkeypatch):
    """Pretend to be a machine: `machine(cpuinfo_text_or_None, cuda=False, mps=False)`."""
    monkeypatch.delenv(device.FORCE_BF16_ENV, raising=False)

    def pretend(cpuinfo: str | None, cuda: bool = False, mps: bool = False, cuda_bf16: bool = True):
        real_read = Path.read_text

        def read_text(self, *a, **kw):
            if str(self) == "/proc/cpuinfo":
                if cpuinfo is None:
                    raise FileNotFoundError(self)
                return cpuinfo
            return real_read(self, *a, **kw)

        monkeypatch.setattr(Path, "read_text", read_text)
        monkeypatch.setattr(device, "_available", lambda d: {"cpu": True, "cuda": cuda, "mps": mps}[d])
        import torch

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        device.cpu_has_native_bf16.cache_clear()

    yield pretend
    device.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("kind", CPUS)
def test_auto_on_each_cpu_kind(machine, kind):
    text, native = CPUS[kind]
    machine(text)
    assert device.native_bf16_from_cpuinfo(text) is native
    assert device.choose("auto", "auto") == device.Placement("cpu", "bf16" if native else "fp32")


@pytest.mark.parametrize("kind", CPUS)
def test_gpus_take_fp16_whatever_the_cpu(machine, kind):
    machine(CPUS[kind][0], cuda=True)
    assert device.choose("auto", "auto") == device.Placement("cuda", "fp16")
    machine(CPUS[kind][0], mps=True)
    assert device.choose("auto", "auto") == device.Placement("mps", "fp16")
    assert device.choose("cpu", "auto").device == "cpu"  # an explicit CPU beside a GPU stays the CPU


def test_cuda_first_then_mps(machine):
    machine(ZEN5, cuda=True, mps=True)
    assert device.choose().device == "cuda"


def test_missing_device_is_a_usage_error(machine):
    machine(ZEN3)
    with pytest.raises(UsageError, match="--device cuda"):
        device.choose("cuda", "auto")


def test_explicit_dtype_is_kept(machine):
    machine(ZEN3)
    assert device.choose("cpu", "bf16").dtype_name == "bf16"  # asked for: slow, but the user's call


@pytest.mark.parametrize("forced, expected", [("1", "bf16"), ("0", "fp32")])
@pytest.mark.parametrize("kind", ["zen3", "sapphire-rapids", "macos"])
def test_environment_forces_the_cpu_answer(machine, monkeypatch, kind, forced, expected):
    machine(CPUS[kind][0])
    monkeypatch.setenv(device.FORCE_BF16_ENV, forced)
    assert device.choose("cpu", "auto").dtype_name == expected


def test_bad_force_value_is_a_usage_error(machine, monkeypatch):
    machine(ZEN3)
    monkeypatch.setenv(device.FORCE_BF16_ENV, "yes")
    with pytest.raises(UsageError, match=device.FORCE_BF16_ENV):
        device.choose("cpu", "auto")


# (cpu, gpu, recorded dtype) -> dtype a replay renders in, and whether it says so
REPLAYS = [
    (ZEN3, None, "fp32", "fp32", False),
    (ZEN3, None, "bf16", "fp32", True),   # bf16 emulated on AVX2: auto's fp32, said
    (ZEN3, None, "fp16", "fp32", True),   # a CUDA fp16 render replayed on a CPU
    (ZEN5, None, "bf16", "bf16", False),
    (ZEN5, None, "fp32", "fp32", False),  # fp32 runs everywhere: taken as recorded, not auto's bf16
    (ZEN5, None, "fp16", "bf16", True),
    (SAPPHIRE_RAPIDS, None, "bf16", "bf16", False),
    (None, "mps", "fp16", "fp16", False),
    (None, "mps", "bf16", "fp16", True),
    (ZEN3, "cuda", "bf16", "bf16", False),
    (ZEN3, "cuda", "fp32", "fp32", False),
    (ZEN3, "cuda", "fp16", "fp16", False),
    (ZEN3, None, "float8", "fp32", True),  # an unknown recorded name is never passed on
]


@pytest.mark.parametrize("cpu, gpu, recorded, expected, noted", REPLAYS)
def test_replay_dtype(machine, cpu, gpu, recorded, expected, noted):
    machine(cpu, cuda=gpu == "cuda", mps=gpu == "mps")
    dev = device.choose("auto", "fp32").device
    dtype, note = device.replay_dtype(recorded, dev)
    assert dtype == expected
    assert (note is not None) is noted
    if noted:
        assert recorded in note and expected in note


def test_cuda_without_bf16_support_replays_fp16(machine):
    machine(ZEN3, cuda=True, cuda_bf16=False)
    assert device.replay_dtype("bf16", "cuda")[0] == "fp16"


def test_no_recorded_dtype_means_auto(machine):
    machine(ZEN5)
    assert device.replay_dtype(None, "cpu") == ("auto", None)

"""Issue 31's fp32 CPU levers in the UNet: GEGLU's dense gate (the same bytes) and the 3x3 convolutions on packed
weights (models/packed_conv.py: inside `packed_convs`, which a render's sampling enters; a few ulp from torch's own
convolution).

The oracle is torch's own op on the same random weights: F.conv2d for the packed convolution, within 1e-5 of the
largest output (the brgemm kernel sums the 9 * C_in products in another order than the direct kernel; measured
~5e-6), and the pre-lever GEGLU expression, bit for bit. Both must give one result at 1-4 threads (the project's
thread-count invariance, tests/test_thread_invariance.py). While packed, the plain weight's storage is freed (a
weight is held once) and it comes back bit for bit when the session ends, also by an exception; a render leaves
every UNet weight as it found it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from sdcli import pipeline
from sdcli.loading.checkpoint import load_models
from sdcli.models import packed_conv
from sdcli.models.invariant import gelu
from sdcli.models.packed_conv import PackedConv2d, packed_convs
from sdcli.models.unet import GEGLU
from sdcli.runtime import device

THREADS = (1, 2, 3, 4)
CPU = torch.device("cpu")


@pytest.fixture
def small_weights(monkeypatch):
    """Pack the small weights of these tests too (the floor keeps weights under 1 MiB on torch's path)."""
    monkeypatch.setattr(packed_conv, "PACKED_MIN_BYTES", 0)
    monkeypatch.delenv(packed_conv.SWITCH_ENV, raising=False)


@pytest.fixture(autouse=True)
def _threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def conv(cin: int, cout: int, stride: int = 1, seed: int = 0) -> PackedConv2d:
    torch.manual_seed(seed)
    m = PackedConv2d(cin, cout, 3, stride=stride, padding=1)
    with torch.no_grad():
        m.weight.mul_(3.0)  # larger outputs than the default init: more bits that can differ
    return m.requires_grad_(False)


def plain(m: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    return F.conv2d(x, m.weight if weight is None else weight, m.bias, m.stride, m.padding)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("cin,cout,hw,stride", [(64, 96, 16, 1), (96, 64, 8, 1), (64, 64, 16, 2), (4, 32, 8, 1)])
def test_packed_matches_torch_and_threads(small_weights, cin, cout, hw, stride):
    m = conv(cin, cout, stride)
    x = torch.randn(2, cin, hw, hw)
    ref = plain(m, x)
    with torch.inference_mode(), packed_convs(CPU):
        outs = []
        for t in THREADS:
            torch.set_num_threads(t)
            outs.append(m(x))
        assert m._packed is not None  # the packed path ran
    assert outs[0].is_contiguous() and outs[0].shape == ref.shape
    assert close(outs[0], ref) < 1e-5
    for t, o in zip(THREADS, outs):
        assert torch.equal(o, outs[0]), f"{t} threads"


@pytest.mark.parametrize("hw", [8, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_channels_last_packed_at_any_size_the_same_bytes(small_weights, hw, dtype):
    """channels_last maps (as a CPU runs the UNet in bf16 and fp32): packed at any map size, bf16 where oneDNN has
    bf16 kernels (AVX-512 and up), and then the very bytes of torch's own path, which runs the same brgemm kernel on
    a weight reordered at every call; channels_last out, one result at every thread count. Elsewhere: torch's path."""
    cl = torch.channels_last
    m = conv(64, 96).to(dtype, memory_format=cl)
    saved = m.weight.clone()
    x = torch.randn(2, 64, hw, hw).to(dtype, memory_format=cl)
    with torch.inference_mode(), packed_convs(CPU):
        outs = []
        for t in THREADS:
            torch.set_num_threads(t)
            outs.append(m(x))
            assert torch.equal(outs[-1], plain(m, x, saved)), f"{t} threads"
        has_kernels = torch.ops.mkldnn._is_mkldnn_bf16_supported() if dtype == torch.bfloat16 else device.cpu_onednn()
        assert (m._packed is not None) == has_kernels
    assert outs[0].is_contiguous(memory_format=cl)
    for t, o in zip(THREADS, outs):
        assert torch.equal(o, outs[0]), f"{t} threads"
    assert m._packed is None and torch.equal(m.weight, saved) and m.weight.is_contiguous(memory_format=cl)


def test_a_full_size_weight_is_held_once_and_given_back():
    m = conv(256, 256)  # 2.4 MB: above the real floor
    saved = m.weight.clone()
    x = torch.randn(2, 256, 8, 8)
    with torch.inference_mode(), packed_convs(CPU):
        out = m(x)
        assert m._packed is not None
        assert m.weight.untyped_storage().nbytes() == 0 and m.weight.shape == saved.shape  # freed, shape kept
        assert torch.equal(m(x), out)
    assert m._packed is None
    assert m.weight.untyped_storage().nbytes() == saved.numel() * 4
    assert torch.equal(m.weight, saved)  # bit for bit
    assert close(out, plain(m, x)) < 1e-5


def test_given_back_when_sampling_fails(small_weights):
    m = conv(32, 32)
    saved = m.weight.clone()
    with pytest.raises(KeyboardInterrupt), torch.inference_mode(), packed_convs(CPU):
        m(torch.randn(1, 32, 8, 8))
        raise KeyboardInterrupt
    assert m._packed is None and torch.equal(m.weight, saved)


def test_torch_outside_a_session_and_when_switched_off(small_weights, monkeypatch):
    m = conv(32, 32)
    x = torch.randn(2, 32, 8, 8)
    with torch.inference_mode():
        assert torch.equal(m(x), plain(m, x))  # no session: torch's own convolution
        assert m._packed is None
        monkeypatch.setenv(packed_conv.SWITCH_ENV, "0")
        with packed_convs(CPU):
            assert torch.equal(m(x), plain(m, x))
            assert m._packed is None


def test_not_packed_where_it_does_not_apply(small_weights):
    m = conv(16, 16)
    with torch.inference_mode(), packed_convs(CPU):
        big = torch.randn(1, 16, 32, 32)  # a contiguous map above PACKED_MAX_PIXELS
        assert torch.equal(m(big), plain(m, big))
        assert m._packed is None
        m.padding_mode = "circular"  # --seamless
        x = torch.randn(1, 16, 8, 8)
        assert torch.equal(m(x), nn.Conv2d.forward(m, x))
        assert m._packed is None
        m.padding_mode = "zeros"
        m64 = conv(16, 16).double()
        assert torch.equal(m64(x.double()), plain(m64, x.double()))  # fp64: torch's own
        assert m64._packed is None
        buffer = torch.randn(2 * 16 * 16 * 9)  # a weight that is a view into a larger buffer: never freed
        shared = conv(16, 16)
        shared.weight = nn.Parameter(buffer[: 16 * 16 * 9].view(16, 16, 3, 3), requires_grad=False)
        assert torch.equal(shared(x), plain(shared, x))
        assert shared._packed is None and buffer.untyped_storage().nbytes() == buffer.numel() * 4
        aliased = conv(16, 16)
        alias = aliased.weight.detach()  # another tensor on the weight's storage (an original kept elsewhere)
        assert torch.equal(aliased(x), plain(aliased, x))
        assert aliased._packed is None and torch.equal(alias, aliased.weight)
    with packed_convs(CPU):
        m = conv(16, 16).float()
        x = torch.randn(1, 16, 8, 8, requires_grad=True)  # autograd: torch's own
        assert torch.equal(m(x), plain(m, x))
        assert m._packed is None


def test_under_the_floor_torch_even_in_a_session(monkeypatch):
    monkeypatch.delenv(packed_conv.SWITCH_ENV, raising=False)
    m = conv(64, 64)  # 0.15 MB
    x = torch.randn(2, 64, 8, 8)
    with torch.inference_mode(), packed_convs(CPU):
        assert torch.equal(m(x), plain(m, x))
        assert m._packed is None


def test_another_shape_or_a_move_in_a_session_unpacks_first(small_weights):
    m = conv(32, 48)
    saved = m.weight.clone()
    x = torch.randn(2, 32, 8, 8)
    with torch.inference_mode(), packed_convs(CPU):
        m(x)
        big = torch.randn(2, 32, 32, 32)
        assert torch.equal(m(big), plain(m, big, saved))  # unpacked: torch's path on the plain weight
        assert m._packed is None and torch.equal(m.weight, saved)
        assert close(m(x[:1]), plain(m, x[:1], saved)) < 1e-5  # packed again, for this shape
        assert m._packed is not None
        m.double()  # .to() inside a session: from the plain weight
        assert m._packed is None and torch.equal(m.weight, saved.double())


@pytest.mark.usefixtures("one_thread")
def test_a_render_packs_and_leaves_the_weights_as_it_found_them(tiny_sd1, small_weights, monkeypatch):  # noqa: F811
    """Through the real pipeline (tiny SD1 model, fp32, 64 px: its UNet's maps are 8x8 and 4x4): the 3x3
    convolutions are packed while sampling, every UNet weight is the same bits afterwards, and the image is
    within the packed convolutions' ulps of torch's path."""
    models = load_models(tiny_sd1, dtype=torch.float32, device="cpu")
    unet = models.stage("unet")
    saved = {k: v.clone() for k, v in unet.state_dict().items()}
    packs = []
    pack = PackedConv2d._pack
    monkeypatch.setattr(PackedConv2d, "_pack", lambda self, x: (packs.append(self), pack(self, x))[1])

    def render():
        plan = pipeline.make_plan("euler", "auto", 2, cfg=5.0, family=models.family)
        cond, uncond = pipeline.encode_text(models, "a fox", "")
        return pipeline.txt2img(models, plan, cond, uncond, [1], 64, 64)

    packed = render()
    n_convs = sum(isinstance(m, PackedConv2d) for m in unet.modules())
    assert n_convs > 0 and len(set(packs)) == n_convs  # every UNet 3x3 convolution, once per sampling
    assert all(torch.equal(v, saved[k]) for k, v in unet.state_dict().items())
    assert all(m._packed is None for m in unet.modules() if isinstance(m, PackedConv2d))
    monkeypatch.setenv(packed_conv.SWITCH_ENV, "0")  # torch's own path: the direct kernel on contiguous maps
    monkeypatch.setenv(device.SWITCH_ENV, "0")
    models = load_models(tiny_sd1, dtype=torch.float32, device="cpu")
    reference = render()
    assert not torch.equal(packed, reference)  # the packed path did run (another summation order)
    assert close(packed, reference) < 1e-4


def test_a_module_let_go_inside_the_session_is_not_unpacked(small_weights, monkeypatch):
    """The session holds its convolutions weakly: one dropped before the end (lean's release of the UNet) goes with
    its packed weight, without the reorder back; one still in use is unpacked as ever."""
    unpacked = []
    unpack = PackedConv2d.unpack
    monkeypatch.setattr(PackedConv2d, "unpack", lambda self: (unpacked.append(self._packed is not None),
                                                             unpack(self))[1])  # fmt: skip
    kept, dropped = conv(32, 32, seed=1), conv(32, 32, seed=2)
    want = kept.weight.clone()
    with torch.inference_mode(), packed_convs(CPU):
        kept(torch.randn(1, 32, 8, 8))
        dropped(torch.randn(1, 32, 8, 8))
        assert kept._packed is not None and dropped._packed is not None
        del dropped
    assert unpacked == [True] and kept._packed is None and torch.equal(kept.weight, want)


def test_a_render_unpacks_only_a_unet_it_keeps(tiny_sd1, small_weights, monkeypatch, tmp_path):  # noqa: F811
    """`sdcli generate` under lean lets the UNet go inside the packing session: its weights are not reordered back
    for nothing; under keep the UNet stays and is unpacked. The images are the same bytes."""
    from _cli import invoker, pixels

    from sdcli.loading import residency

    events = []
    pack, unpack = PackedConv2d._pack, PackedConv2d.unpack
    monkeypatch.setattr(PackedConv2d, "_pack", lambda self, x: (events.append("pack"), pack(self, x))[1])
    monkeypatch.setattr(PackedConv2d, "unpack", lambda self: (events.append("unpack" if self._packed is not None
                                                                            else "none"), unpack(self))[1])  # fmt: skip
    run, seen = invoker({}), {}
    for policy in ("lean", "keep"):
        monkeypatch.setenv(residency.POLICY_ENV, policy)
        events.clear()
        out = tmp_path / f"{policy}.png"
        run("generate", "a fox", "--model", str(tiny_sd1), "-W", "64", "-H", "64", "--steps", "2", "--seed", "3",
            "--dtype", "fp32", "-o", str(out))  # fmt: skip
        seen[policy] = (events.count("pack"), events.count("unpack"))
        assert policy != "lean" or not (tmp_path / "keep.png").exists()
    packs = seen["lean"][0]
    assert packs > 0 and seen == {"lean": (packs, 0), "keep": (packs, packs)}
    assert (pixels(tmp_path / "lean.png") == pixels(tmp_path / "keep.png")).all()


def old_geglu(module: GEGLU, x: torch.Tensor) -> torch.Tensor:
    """GEGLU as it was before issue 31: gelu through a dense copy of the strided gate and back, a strided product."""
    value, gate = module.proj(x).chunk(2, dim=-1)
    return value * gelu(gate, inplace=True)


@pytest.mark.parametrize("n", [77, 4096])
def test_geglu_same_bytes(n):
    torch.manual_seed(0)
    m = GEGLU(40, 160)
    x = torch.randn(2, n, 40)
    with torch.inference_mode():
        outs = []
        for t in THREADS:
            torch.set_num_threads(t)
            outs.append(m(x))
            assert torch.equal(outs[-1], old_geglu(m, x)), f"{t} threads"
    assert all(torch.equal(o, outs[0]) for o in outs)
    y = torch.randn(2, 8, 40, requires_grad=True)  # under autograd: the plain product, gradients flow
    m(y).sum().backward()
    assert y.grad is not None


class _Thresholds:
    """glibc's mallopt as device.py calls it, remembering the thresholds."""

    def __init__(self):
        self.thresholds: dict[int, int] = {}

    def mallopt(self, param: int, value: int) -> int:
        self.thresholds[param] = value
        return 1

    def malloc_trim(self, pad: int) -> int:
        return 1

    def madvise(self, start, length, advice) -> int:
        return 0


def test_packed_under_the_pinned_heap_thresholds(small_weights, monkeypatch):
    """A packed weight is made under the pinned thresholds (device.pinned_heap: its temporaries get mappings of their
    own instead of staying resident in the held heap), and the held ones are back for the sampling after it."""
    from sdcli.runtime import device

    libc = _Thresholds()
    monkeypatch.setattr(device, "_glibc", lambda: libc)
    monkeypatch.delenv(device.HOLD_ENV, raising=False)
    pinned = {device.M_MMAP_THRESHOLD: device.MMAP_THRESHOLD, device.M_TRIM_THRESHOLD: device.TRIM_THRESHOLD}
    held = {device.M_MMAP_THRESHOLD: device.SAMPLING_THRESHOLD, device.M_TRIM_THRESHOLD: device.SAMPLING_THRESHOLD}
    seen = []
    reorder = torch.ops.mkldnn._reorder_convolution_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight",
                        lambda *a: (seen.append(dict(libc.thresholds)), reorder(*a))[1])
    m = conv(32, 32)
    with torch.inference_mode(), packed_convs(CPU), device.sampling_heap(CPU):
        m(torch.randn(1, 32, 8, 8))
        assert libc.thresholds == held
    assert seen == [pinned] and m._packed is None
    with device.pinned_heap():  # outside a held heap: nothing to change
        assert libc.thresholds == pinned

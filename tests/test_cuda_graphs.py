"""CUDA-graph bookkeeping and the CUDA precision rule, checked without a GPU.

A capture itself needs CUDA (scripts/bench_cuda.py checks replays against eager output on a GPU). What can go
wrong without one is the bookkeeping: replaying a graph captured for other shapes, other weights or other
padding, or failing loudly where eager mode would work. Captures are replaced by a recording stand-in here."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from sdcli.runtime import cuda_graphs
from sdcli.runtime.device import Placement, configure
from sdcli.loading.residency import Residency


class FakeGraph:
    """Stands in for a captured graph: replay recomputes the module into the static output, like a real one."""

    def __init__(self, module, static, out):
        self.module, self.static, self.out = module, static, out

    def replay(self):
        self.out.copy_(self.module(*self.static))


@pytest.fixture
def recording(monkeypatch):
    captures = []

    def capture(self, key, inputs):
        static = tuple(t.clone() for t in inputs)
        out = self.module(*static)
        captures.append(key)
        self.graphs[key] = (FakeGraph(self.module, static, out), static, out)

    monkeypatch.setattr(cuda_graphs.GraphedForward, "_capture", capture)
    return captures


def test_graphs_only_on_cuda(monkeypatch):
    monkeypatch.delenv("SDCLI_CUDA_GRAPHS", raising=False)
    assert not cuda_graphs.enabled(torch.device("cpu"))
    assert cuda_graphs.enabled(torch.device("cuda"))
    monkeypatch.setenv("SDCLI_CUDA_GRAPHS", "0")
    assert not cuda_graphs.enabled(torch.device("cuda"))


def test_replays_follow_new_inputs_and_capture_once_per_shape(recording):
    net = nn.Linear(4, 3)
    run = cuda_graphs.graphed(net)
    assert cuda_graphs.graphed(net) is run  # kept on the model for later jobs
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(run(a), net(a))
        out_b = run(b)
        assert torch.equal(out_b, net(b))
        run(torch.randn(5, 4))
    assert len(recording) == 2  # (2, 4) once, (5, 4) once
    assert not torch.equal(out_b, run(a))  # the returned tensor is a copy: a later replay does not change it


def test_replaced_weights_are_recaptured(recording):
    net = nn.Linear(4, 3)
    run = cuda_graphs.graphed(net)
    x = torch.randn(2, 4)
    with torch.no_grad():
        run(x)
        net.weight = nn.Parameter(net.weight * 2)  # what a LoRA merge does: a new tensor, a new address
        assert torch.equal(run(x), net(x))
    assert len(recording) == 2


def test_shape_cache_is_bounded(recording):
    run = cuda_graphs.graphed(nn.Linear(4, 3))
    with torch.no_grad():
        for rows in range(1, 6):
            run(torch.randn(rows, 4))
    assert len(run.graphs) <= cuda_graphs.MAX_SHAPES


def test_a_failed_capture_falls_back_to_eager_once(monkeypatch, capsys):
    def no_stream():
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    monkeypatch.setattr(torch.cuda, "Stream", no_stream)
    net = nn.Linear(4, 3)
    run = cuda_graphs.GraphedForward(net)
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(run(x), net(x))
        assert torch.equal(run(x), net(x))
    assert run.error == "capture failed: operation not permitted when stream is capturing"
    assert capsys.readouterr().err.count("CUDA graphs off") == 1


def test_seamless_drops_graphs_captured_with_other_padding(recording):
    from sdcli.pipeline import seamless

    unet = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1))
    vae = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
    models = types.SimpleNamespace(parts=Residency.holding({"unet": unet, "vae": vae}))
    first = cuda_graphs.graphed(unet)
    with seamless(models):
        inside = cuda_graphs.graphed(unet)
        assert inside is not first
    assert cuda_graphs.graphed(unet) is not inside


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize(("device", "dtype", "tf32"), [("cuda", "fp32", False), ("cuda", "fp16", True),
                                                       ("cpu", "fp32", True)])  # fmt: skip
def test_fp32_on_cuda_turns_tf32_off(tf32_flags, device, dtype, tf32):
    configure(Placement(device, dtype))
    assert torch.backends.cudnn.allow_tf32 is tf32
    assert torch.backends.cuda.matmul.allow_tf32 is tf32

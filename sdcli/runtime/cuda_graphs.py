"""CUDA graphs for the UNet: capture one forward per input shape, replay it at every sampler step.

A 512px SD1 step at batch 2 is about a thousand kernel launches. In fp16 an H100-class GPU finishes the
arithmetic of most of them faster than Python can issue them, so the step is bound by launch overhead, not by
the GPU. Replaying a captured graph issues them all at once. Replays run the kernels that eager mode picked for
the same shapes, so the output is the eager output (scripts/bench_cuda.py checks this on the device).

A graph reads fixed buffers: inputs are copied into them and the output is copied out, because the next replay
overwrites it. A graph also holds the addresses of the weights, so it is recaptured whenever a parameter is
replaced (LoRA merging assigns new tensors). Set SDCLI_CUDA_GRAPHS=0 to run eagerly."""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import Tensor, nn

MAX_SHAPES = 2  # each graph keeps its own activation memory: a sampler pass, plus a hires pass, at most


def enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("SDCLI_CUDA_GRAPHS", "1") != "0"


def graphed(unet: nn.Module) -> Callable[..., Tensor]:
    """The UNet as a callable that replays CUDA graphs; one per model, kept on it for later jobs."""
    runner = unet.__dict__.get("_sdcli_graphs")
    if runner is None:
        runner = unet.__dict__["_sdcli_graphs"] = GraphedForward(unet)
    return runner


def forget(unet: nn.Module) -> None:
    """Drop the UNet's graphs: for changes the graphs cannot see (module attributes such as padding modes)."""
    unet.__dict__.pop("_sdcli_graphs", None)


class GraphedForward:
    def __init__(self, module: nn.Module):
        self.module = module
        self.graphs: dict[tuple, tuple] = {}  # input signature -> (graph, static inputs, static output)
        self.weights: tuple[int, ...] = ()  # the parameter addresses the graphs were captured with
        self.error: str | None = None

    def __call__(self, *inputs: Tensor) -> Tensor:
        if self.error is not None:
            return self.module(*inputs)
        weights = tuple(p.data_ptr() for p in self.module.parameters())
        if weights != self.weights:
            self.graphs.clear()
            self.weights = weights
        key = tuple((t.shape, t.dtype) for t in inputs)
        if key not in self.graphs:
            if len(self.graphs) >= MAX_SHAPES:
                self.graphs.clear()  # frees their memory before the new capture takes its own
            try:
                self._capture(key, inputs)
            except Exception as e:  # noqa: BLE001 - whatever stops a capture, eager mode still works: say so once
                from sdcli.runtime import console

                self.error = f"capture failed: {(str(e).splitlines() or [type(e).__name__])[0]}"
                console.info(f"CUDA graphs off ({self.error}); running eagerly")
                return self.module(*inputs)
        graph, static, out = self.graphs[key]
        for buf, t in zip(static, inputs):
            buf.copy_(t)
        graph.replay()
        return out.clone()

    def _capture(self, key: tuple, inputs: tuple[Tensor, ...]) -> None:
        static = tuple(t.clone() for t in inputs)
        # Warm up on a side stream first: cuDNN/cuBLAS choose algorithms and create workspaces, which a capture
        # may not do, and the capture then records exactly the kernels eager mode runs.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.module(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.module(*static)
        self.graphs[key] = (graph, static, out)

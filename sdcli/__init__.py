"""sdcli: Stable Diffusion from the command line, in plain PyTorch."""

import os

from sdcli.runtime.device import intel_cpu

__version__ = "0.1.0"

# One result at any CPU thread count from torch's fp32 GEMMs (MKL on x86): on Intel CPUs MKL otherwise splits long
# sums (K of 5120+) over threads, so an fp32 render at 2 threads differed from 1 (Sapphire Rapids-class, 2026-12).
# Strict conditional numerical reproducibility fixes the order per thread count at no measured cost; MKL reads it
# at its first call, so it is set here, before sdcli runs any (a caller's own setting wins). Not on AMD CPUs: there
# MKL gives one result at any count by itself, and with MKL_CBWR set (any value) a GEMM of 2 rows moved at 3
# threads (Zen 5, 2026-12; the time embedding's Linear under CFG).
if intel_cpu():
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

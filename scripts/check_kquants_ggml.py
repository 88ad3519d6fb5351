"""Dev check: sdcli's K-quant writer (sdcli/quant/kquants.py) against ggml's own C reference quantizers, byte for byte.

    python scripts/check_kquants_ggml.py SOURCE            # SOURCE: a ggml checkout's ggml/ folder, or a source
                                                           # tarball holding one (llama.cpp, stable-diffusion.cpp,
                                                           # stable_diffusion_cpp_python sdists vendor it)

Compiles ggml/src/ggml-quants.c (with the headers beside it, and stubs for the four ggml functions it links to but
the reference quantizers never call) into a shared library in a temporary folder with gcc -O2 -ffp-contract=off
(no fused multiply-adds: the reference's float32 arithmetic as written), then quantizes the same float32 rows
through ``quantize_row_q{2..6}_K_ref`` and through sdcli, and compares the bytes of every block. The rows: Gaussian,
small with an offset, all positive, all negative, zeros, constant, mostly zeros, small integers, heavy-tailed
(Student t, 2 degrees of freedom), rows with one huge outlier, and N(0, 0.02) weights rounded to bf16. Exit 0 when every block of every type is equal.

Not a test: the C source is not in this repository and the test suite downloads nothing (tests/test_kquants.py
checks what can be checked without it: the gguf package's dequantizer reads the blocks back as sdcli's does).
Checked with stable_diffusion_cpp_python 0.4.7's vendored ggml (stable-diffusion.cpp master of 2025).
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sdcli.quant import kquants  # noqa: E402
from sdcli.quant.ggml_types import BY_NAME  # noqa: E402

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
STUBS = """#include <stdlib.h>
void ggml_abort(void) { abort(); }
size_t ggml_row_size(void) { abort(); }
const char * ggml_type_name(void) { abort(); }
size_t ggml_type_size(void) { abort(); }
"""


def ggml_folder(source: Path, into: Path) -> Path:
    """The ggml/ folder of a checkout, or extracted from a tarball into `into` (its src/ and include/ only)."""
    if source.is_dir():
        found = source if (source / "src" / "ggml-quants.c").exists() else next(source.rglob("ggml/src/ggml-quants.c"),
                                                                                None)  # fmt: skip
        if found is None:
            raise SystemExit(f"{source}: no ggml/src/ggml-quants.c under it")
        return found if found == source else found.parent.parent
    with tarfile.open(source) as tar:
        members = [m for m in tar.getmembers() if "/ggml/src/" in m.name or "/ggml/include/" in m.name]
        quants = next((m for m in members if m.name.endswith("ggml/src/ggml-quants.c")), None)
        if quants is None:
            raise SystemExit(f"{source}: no ggml/src/ggml-quants.c in it")
        tar.extractall(into, members=[m for m in members if m.name.endswith((".c", ".h"))], filter="data")
    return into / quants.name.removesuffix("/src/ggml-quants.c")


def build(ggml: Path, into: Path) -> ctypes.CDLL:
    (into / "stubs.c").write_text(STUBS)
    lib = into / "libggml_quants_ref.so"
    subprocess.run(["gcc", "-O2", "-ffp-contract=off", "-shared", "-fPIC", f"-I{ggml / 'src'}",
                    f"-I{ggml / 'include'}", str(ggml / "src" / "ggml-quants.c"), str(into / "stubs.c"), "-lm",
                    "-o", str(lib)], check=True, capture_output=True)  # fmt: skip
    return ctypes.CDLL(str(lib))


def reference(lib: ctypes.CDLL, x: np.ndarray, qtype: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    size = BY_NAME[qtype].type_size
    out = np.zeros(x.size // 256 * size, dtype=np.uint8)
    fn = getattr(lib, f"quantize_row_{qtype[:2].lower()}_K_ref")
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out.reshape(-1, size)


def rows(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    spiky = rng.standard_normal((32, 256))
    spiky[np.arange(32), rng.integers(0, 256, 32)] *= 1000
    cases = {
        "gaussian": rng.standard_normal((256, 256)), "offset": rng.standard_normal((64, 256)) * 0.02 + 0.01,
        "positive": np.abs(rng.standard_normal((32, 256))), "negative": -np.abs(rng.standard_normal((32, 256))),
        "zeros": np.zeros((4, 256)), "constant": np.full((4, 256), 0.5), "integers": rng.integers(-3, 4, (32, 256)),
        "sparse": np.where(rng.random((32, 256)) < 0.7, 0, rng.standard_normal((32, 256))),
        "heavy": rng.standard_t(2, (128, 256)), "outlier": spiky,
        "bf16": (rng.standard_normal((256, 256)) * 0.02).astype(np.float32).view(np.uint32) & 0xFFFF0000,
    }  # fmt: skip
    cases["bf16"] = cases["bf16"].astype(np.uint32).view(np.float32)  # weights as a bf16 checkpoint holds them
    return {k: v.astype(np.float32) for k, v in cases.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    args = ap.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(ggml_folder(args.source, Path(tmp)), Path(tmp))
        for qtype in TYPES:
            for name, x in rows().items():
                ours, theirs = kquants.quantize(x, qtype).reshape(x.shape[0], -1), reference(lib, x, qtype)
                bad = int((ours != theirs).any(axis=1).sum())
                failed += bad
                print(f"{qtype} {name:9s} {len(x) - bad}/{len(x)} blocks equal")
    print("all equal" if not failed else f"{failed} blocks differ")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()

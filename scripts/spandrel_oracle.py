"""spandrel as a test and benchmark oracle, importable where no torchvision matches the installed torch.

spandrel (MIT, chaiNNer) is installed without its dependencies (`pip install --no-deps spandrel einops`).
Importing its package imports every architecture it ships, and two of them (LaMa, RestoreFormer) import
torchvision at module level; the CPU torch here has no matching torchvision (the index's wheel is a CUDA build
that fails beside it: "operator torchvision::nms does not exist"). `import_spandrel` therefore puts a stub with
the three names those modules import into sys.modules while spandrel is imported, and removes it afterwards.
The stub raises if called; ESRGAN, Compact and SwinIR never call it. A torchvision that imports is used as is.
sdcli itself never uses the stub: without a working torchvision, its runtime import of spandrel fails and it
says so (exit 8).
"""

from __future__ import annotations

import sys
import types


def _torchvision_stub() -> dict[str, types.ModuleType]:
    def unavailable(*args, **kwargs):
        raise RuntimeError("torchvision stub (scripts/spandrel_oracle.py): not available here")

    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    tv, transforms, functional = (types.ModuleType(n) for n in names)
    functional.InterpolationMode = type("InterpolationMode", (), {"NEAREST": "nearest", "BILINEAR": "bilinear"})
    functional.rotate = functional.normalize = unavailable
    tv.transforms, transforms.functional = transforms, functional
    return {m.__name__: m for m in (tv, transforms, functional)}


def import_spandrel():
    """The spandrel package (a stub torchvision only during its import, where the real one does not import)."""
    if "spandrel" in sys.modules and sys.modules["spandrel"] is not None:
        return sys.modules["spandrel"]
    try:
        import torchvision  # noqa: F401

        stub = {}
    except Exception:  # absent, or a build for another torch
        stub = _torchvision_stub()
    saved = {name: sys.modules.get(name) for name in stub}
    sys.modules.update(stub)
    try:
        import spandrel
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    return spandrel

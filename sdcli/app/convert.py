"""`sdcli convert`: a pickled .ckpt (read with the restricted unpickler) to .safetensors."""

from __future__ import annotations

from pathlib import Path

from sdcli.runtime import console
from sdcli.runtime.errors import OutputError, UsageError
from sdcli.app.save import refuse_existing


def run_convert(source: Path, output: Path, overwrite: bool) -> None:
    from sdcli.formats.pickle_ckpt import convert_ckpt

    if output.suffix != ".safetensors":
        raise UsageError(f"{output}: the output of convert must be a .safetensors file")
    refuse_existing(output, overwrite)
    try:
        saved = convert_ckpt(source, output)
    except OSError as e:
        raise OutputError(f"{output}: cannot write ({e.strerror or e})") from None
    console.info(f"saved {saved}")

"""`sdcli convert`: a pickled .ckpt (read with the restricted unpickler) to .safetensors; any model sdcli reads
(.safetensors, .ckpt, a diffusers folder, .gguf) to a GGUF file with `--quantize TYPE`; a GGUF file back to a
dequantized .safetensors file.

A GGUF is written under the LDM single-file names (formats/ldm.py), the whole model in one file as
stable-diffusion.cpp writes it (no ``general.architecture``), each tensor typed by quant.quantize.choose_type
(the VAE, norms, biases and embedders stay float) after the user's ``--tensor-type-rules``. Entries a load skips
on purpose (EMA copies, schedule buffers: formats/strict.IGNORED_KEYS) are not written. One tensor is in memory at
a time.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from sdcli.runtime import console
from sdcli.runtime.errors import BadInputError, OutputError, UsageError
from sdcli.app.save import refuse_existing

# the checkpoint metadata a GGUF keeps (what detection reads: the prediction type, the LCM marker)
KEPT_METADATA = ("modelspec.", "sdcli.")


def run_convert(source: Path, output: Path, overwrite: bool, quantize: str | None = None,
                type_rules: str | None = None, convs: bool = False) -> None:  # fmt: skip
    suffix = output.suffix.lower()
    if suffix not in (".safetensors", ".gguf"):
        raise UsageError(f"{output}: the output of convert must be a .safetensors or .gguf file")
    if suffix == ".gguf" and quantize is None:
        raise UsageError(f"{output}: a GGUF output needs --quantize TYPE (q8_0, q4_k, q4_0, f16, ...)")
    if suffix == ".safetensors" and (quantize is not None or type_rules is not None or convs):
        raise UsageError("--quantize, --tensor-type-rules and --quantize-convs write a GGUF file: name the output "
                         ".gguf")  # fmt: skip
    if suffix == ".gguf":
        _check_types(quantize, type_rules)
    refuse_existing(output, overwrite)
    if suffix == ".gguf":
        _to_gguf(source, output, quantize, type_rules, convs)
    else:
        _to_safetensors(source, output)


def _check_types(quantize: str, type_rules: str | None) -> None:
    """Both checked before any file is read (a typo must not cost a model load)."""
    from sdcli.quant.quantize import check_writable, parse_type_rules

    check_writable(quantize)
    parse_type_rules(type_rules or "")


def _to_safetensors(source: Path, output: Path) -> None:
    from sdcli.formats.gguf import is_gguf
    from sdcli.formats.pickle_ckpt import convert_ckpt

    try:
        saved = _dequantized(source, output) if is_gguf(source) else convert_ckpt(source, output)
    except OSError as e:
        if e.filename is not None and Path(e.filename) == Path(source):  # reading it failed, not the write
            raise BadInputError(f"{source}: cannot read ({e.strerror or e})") from None
        raise OutputError(f"{output}: cannot write ({e.strerror or e})") from None
    console.info(f"saved {saved}")


def _dequantized(source: Path, output: Path) -> Path:
    """A GGUF file as .safetensors under its LDM names, one tensor in memory at a time: float tensors as stored,
    GGML blocks as float32 (bit-equal to gguf.quants.dequantize), so the result is the model the GGUF computes."""
    import os

    from sdcli.formats.safetensors import write_streamed
    from sdcli.formats.source import open_file

    src = open_file(source)
    described = {k: ("F32" if e.quantized else e.dtype, e.shape) for k, e in src.entries.items()}
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        write_streamed(tmp, described, src.get, {"format": "pt", "converted_from": source.name})
        os.replace(tmp, output)
    finally:
        src.close()
        tmp.unlink(missing_ok=True)
    return output


def _to_gguf(source: Path, output: Path, quantize: str, type_rules: str | None, convs: bool) -> None:
    import torch

    from sdcli.formats.diffusers import open_source
    from sdcli.formats.safetensors import FLOAT_DTYPES
    from sdcli.formats.strict import is_ignored, listing
    from sdcli.quant.quantize import parse_type_rules, write_gguf

    src = open_source(source)
    try:
        keys = [k for k in src.entries if not is_ignored(k)]
        dropped = len(src.entries) - len(keys)
        not_float = [k for k in keys if src.entries[k].dtype not in FLOAT_DTYPES and not src.entries[k].quantized]
        if not_float:
            raise BadInputError(f"{source}: tensors that are not floating point cannot be written as GGUF: "
                                f"{listing(not_float)}")  # fmt: skip
        with torch.device("meta"):  # shapes and dtypes for the header; the values are read one by one
            described = {k: torch.empty(src.entries[k].shape, dtype=FLOAT_DTYPES.get(src.entries[k].dtype,
                                                                                  torch.float32)) for k in keys}
        meta = {k: v for k, v in src.metadata.items() if k.startswith(KEPT_METADATA)}
        if src.prediction_hint:
            meta["sdcli.prediction_hint"] = src.prediction_hint
        written = write_gguf(output, described, quantize, None, parse_type_rules(type_rules or ""), read=src.get,
                             metadata=meta, convs=convs)  # fmt: skip
    finally:
        src.close()
    counts = ", ".join(f"{n} {t}" for t, n in sorted(Counter(written.values()).items()))
    note = f"; {dropped} entries a load skips (EMA, schedule buffers) left out" if dropped else ""
    console.info(f"saved {output} ({counts}; {output.stat().st_size / 2**20:.1f} MiB){note}")

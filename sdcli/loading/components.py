"""Text encoders given as files of their own (--clip-l, --clip-g, --t5), as ComfyUI users keep them beside a FLUX
or SD3 diffusion model: each file's tensors are seen under the place its encoder has in an SD3-style single file
(``text_encoders.clip_l.transformer.``, ...), so detection and the strict load treat them like the checkpoint's own.

A file given for an encoder replaces the checkpoint's copy of it; an encoder the family needs that neither holds is
refused with exit 4 naming the option that gives it. The T5 plan accepts the embedding under either name files use
(models/t5.EMBEDDING_ALIAS).
"""

from __future__ import annotations

from pathlib import Path

from sdcli.runtime.errors import ModelNotFoundError, UsageError
from sdcli.formats.ldm import refuse_empty
from sdcli.formats.source import Entry, WeightSource, open_file
from sdcli.formats.strict import Plan, identity_plan
from sdcli.models.t5 import EMBEDDING_ALIAS

# What each encoder option's file usually is (for the message when one is missing)
EXAMPLES = {"--clip-l": "clip_l.safetensors", "--clip-g": "clip_g.safetensors", "--t5": "t5xxl_fp16.safetensors"}


def config_key(flag: str) -> str:
    """The config key of an encoder option: "--clip-l" -> "clip_l"."""
    return flag.lstrip("-").replace("-", "_")


def check_flags(family, files: dict[str, str | None]) -> None:
    """Encoder files given for a family that has no such encoder are refused (exit 2) rather than ignored."""
    takes = {config_key(spec.flag) for spec in family.text if spec.flag}
    extra = sorted(key for key, path in files.items() if path and key not in takes)
    if extra:
        names = ", ".join("--" + key.replace("_", "-") for key in extra)
        raise UsageError(f"{family.title} has no text encoder for {names}")


def _entries(path: Path, prefix: str) -> dict[str, Entry]:
    """A text encoder file's entries under `prefix`: its keys as stored, or without that prefix when it has it."""
    source = open_file(path)
    try:  # its own file named: once merged, the checkpoint's name would be on the error (formats/ldm.shapes_of)
        refuse_empty({k: e.shape for k, e in source.entries.items()}, source.entries, path)
        keys = list(source.entries)
        strip = prefix if keys and all(k.startswith(prefix) for k in keys) else ""
        return {prefix + k[len(strip):]: e for k, e in source.entries.items()}
    finally:
        source.close()


def with_text_files(source: WeightSource, family, files: dict[str, str | None]) -> WeightSource:
    """`source` with each given encoder file's tensors in its encoder's place (the checkpoint's own copy of that
    encoder left out)."""
    given = {spec.prefix: Path(files[config_key(spec.flag)]) for spec in family.text
             if spec.flag and files.get(config_key(spec.flag))}  # fmt: skip
    if not given:
        return source
    if source._tensors is not None:  # a pickle's tensors are held in memory by name: no file can join them
        raise UsageError(f"{source.path}: text encoder files (--clip-l, --clip-g, --t5) go with a .safetensors "
                         "model; convert this .ckpt first (sdcli convert)")
    for path in given.values():
        if not path.is_file():
            raise ModelNotFoundError(f"{path}: no such text encoder file")
    entries = {k: e for k, e in source.entries.items() if not k.startswith(tuple(given))}
    for prefix, path in given.items():
        entries.update(_entries(path, prefix))
    return WeightSource(source.path, entries, source.metadata, source.prediction_hint, source.layout,
                        source._tensors)  # fmt: skip


def absent_optional(family, texts) -> list[str]:
    """The options of the optional encoders the loaded model runs without (SD3 without T5: zeros in its place)."""
    return [spec.flag for spec, cfg in zip(family.text, texts or (None,) * len(family.text))
            if spec.optional and cfg is None]


def missing_encoder(family, spec, model: Path) -> ModelNotFoundError:
    """Exit 4 for an encoder the family needs that no file holds, naming the option that gives it."""
    example = EXAMPLES.get(spec.flag, "FILE.safetensors")
    return ModelNotFoundError(f"{model}: {family.title} needs its {spec.kind.upper()} text encoder "
                              f"({spec.prefix}*), which this file does not hold: give it with "
                              f"{spec.flag} {example}")


def t5_plan(keys: list[str], prefix: str) -> tuple[Plan, list[str]]:
    """T5's strict plan: every key under `prefix` by name, the embedding under either of its names (one kept)."""
    plan, unplaced = identity_plan(keys, prefix)
    alias, name = EMBEDDING_ALIAS
    if alias in plan:
        key = plan.pop(alias)
        plan.setdefault(name, key)
    return plan, unplaced

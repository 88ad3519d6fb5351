"""Bad weight files through the real `sdcli generate`: each one is a single `error:` line naming the file and
saying what it is, with the documented exit code, no traceback and no image written (RELIABILITY.md,
"Weights and other input files"; README "Exit codes" / "Safety model")."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403
from safetensors.torch import load_file, save_file


def _generate(model: Path, tmp_path: Path):
    result = cli(*render_args(model, "-o", "out.png"))
    assert not (tmp_path / "out.png").exists()
    assert temp_files(tmp_path) == []
    return result


def _rewrite(src: Path, dst: Path, edit) -> Path:
    state = load_file(src)
    edit(state)
    save_file(state, str(dst))
    return dst


# ---------------------------------------------------------------- the file itself


def test_missing_model_file(tmp_path):
    assert_clean_error(_generate(tmp_path / "nope.safetensors", tmp_path), 4, "nope.safetensors", "no such file")


def test_model_is_an_empty_directory(tmp_path):
    (tmp_path / "folder.safetensors").mkdir()
    assert_clean_error(_generate(tmp_path / "folder.safetensors", tmp_path), 3, "folder.safetensors",
                       "not a diffusers model")


def test_unreadable_model_file(tiny_sd1, tmp_path, monkeypatch):
    """Tests run as root, where chmod 000 does not stop a read: make open() fail the way it would."""
    import builtins

    target = tmp_path / "locked.safetensors"
    target.write_bytes(tiny_sd1.read_bytes()[:4096])
    real_open = builtins.open

    def guarded(file, *args, **kwargs):
        if Path(str(file)) == target:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    assert_clean_error(_generate(target, tmp_path), 3, "locked.safetensors", "Permission denied")


def _garbage() -> bytes:
    data = bytearray(random.Random(0).randbytes(4096))
    data[0] = 0x41  # not a sniffable magic byte: the length field decides
    return bytes(data)


BAD_FILES = {
    "empty": (b"", "empty"),
    "short": (b"\x10\x00\x00", "too short"),
    "garbage": (_garbage(), "header length is past the end"),
    "lfs": (b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 4265380512\n",
            "git-LFS pointer"),
    "html": (b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head></html>\n", "HTML"),
    "gguf": (b"GGUF\x03\x00\x00\x00" + b"\x00" * 64, "GGUF"),
    "not_json": ((8).to_bytes(8, "little") + b"\xff\xfe{junk}", "header is not JSON"),
    "json_list": ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_wrong_kind_of_file_behind_a_safetensors_name(kind, tmp_path):
    data, what = BAD_FILES[kind]
    path = tmp_path / f"{kind}.safetensors"
    path.write_bytes(data)
    assert_clean_error(_generate(path, tmp_path), 3, f"{kind}.safetensors", what)


def test_pickle_behind_a_safetensors_name_is_named_not_loaded(tiny_sd1, tmp_path):
    """A real, loadable torch checkpoint renamed .safetensors: said to be a pickle, never unpickled."""
    path = tmp_path / "renamed.safetensors"
    torch.save({"state_dict": load_file(tiny_sd1)}, path)
    assert_clean_error(_generate(path, tmp_path), 3, "renamed.safetensors", "pickle")
    path.write_bytes(pickle.dumps({"x": 1}, protocol=2))
    assert_clean_error(_generate(path, tmp_path), 3, "renamed.safetensors", "pickle")


def test_truncated_model(tiny_sd1, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(tiny_sd1.read_bytes()[: tiny_sd1.stat().st_size // 2])
    assert_clean_error(_generate(path, tmp_path), 3, "cut.safetensors", "truncated")


# ---------------------------------------------------------------- right format, wrong model


def test_wrong_keys_and_shapes_are_listed(tiny_sd1, tmp_path):
    gone = "model.diffusion_model.input_blocks.1.0.in_layers.2.bias"
    odd = "first_stage_model.decoder.conv_out.bias"

    def edit(state):
        del state[gone]
        state[odd] = torch.zeros(5)

    path = _rewrite(tiny_sd1, tmp_path / "arch.safetensors", edit)
    line = assert_clean_error(_generate(path, tmp_path), 3, "arch.safetensors", "missing: input_blocks.1.0.in_layers.2.bias")
    # the UNet is checked first; fix it and the VAE shape is named next
    path = _rewrite(tiny_sd1, tmp_path / "arch2.safetensors", lambda s: s.update({odd: torch.zeros(5)}))
    assert_clean_error(_generate(path, tmp_path), 3, "arch2.safetensors", f"wrong shape: {odd} [5] != [3]")
    assert "UNet" in line


def test_file_of_another_kind_of_model_names_the_file(tiny_sd1, tmp_path):
    """A VAE-only file (a common mix-up) passed as --model."""
    path = _rewrite(tiny_sd1, tmp_path / "vae_only.safetensors",
                    lambda s: [s.pop(k) for k in list(s) if not k.startswith("first_stage_model.")])
    assert_clean_error(_generate(path, tmp_path), 3, "vae_only.safetensors", "no UNet weights")


def test_wrong_dtypes_are_listed(tiny_sd1, tmp_path):
    keys = ["model.diffusion_model.out.2.bias", "model.diffusion_model.input_blocks.0.0.bias"]

    def edit(state):
        for k in keys:
            state[k] = state[k].to(torch.int32)

    path = _rewrite(tiny_sd1, tmp_path / "ints.safetensors", edit)
    assert_clean_error(_generate(path, tmp_path), 3, "ints.safetensors", *keys, "I32")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_a_numerical_error(tiny_sd1, tmp_path, value):
    key = "model.diffusion_model.middle_block.0.in_layers.2.weight"

    def edit(state):
        state[key].view(-1)[7] = value

    path = _rewrite(tiny_sd1, tmp_path / "nan.safetensors", edit)
    assert_clean_error(_generate(path, tmp_path), 5, "nan.safetensors", key)


# ---------------------------------------------------------------- pickles never run


class _Evil:
    """Unpickling this runs code that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("name", ["evil.ckpt", "evil.pt", "evil.bin", "evil.safetensors"])
@pytest.mark.parametrize("fmt", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_payload_never_runs(tiny_sd1, tmp_path, name, fmt):
    marker = tmp_path / "marker.txt"
    path = tmp_path / name
    payload = {"state_dict": load_file(tiny_sd1), "evil": _Evil(marker)}
    if fmt == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    for command in (render_args(path, "-o", "out.png"), ["inspect", str(path)]):
        result = cli(*command)
        assert_clean_error(result, 3, name)
        assert not marker.exists(), "the pickle payload ran"
    assert files_in(tmp_path) == sorted([name])

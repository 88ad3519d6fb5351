"""Fuzz-style malformed configs and prompts files through the real `sdcli generate` (RELIABILITY.md "Prompts and
configs"): every input, generated deterministically, either runs (--dry-run: no model needed) or fails with ONE
clean `error:` line naming the file and the key or line, exit 2 or 3; never a traceback, never exit 1."""

from __future__ import annotations

import json
import random

import pytest
from _fixtures_reliability import *  # noqa: F403

from sdcli.config import FIELDS

# YAML scalars that YAML 1.1 (or a careless reader) would turn into something else, plus wrong types,
# huge, negative and out-of-range values.
YAML_VALUES = [
    "no", "on", "yes", "off", "y", "1:30", "0x1F", "0o17", "017", "1e3", "1_000", ".inf", "-.inf", ".nan", "~",
    "null", "''", "[]", "{}", "[1, 2]", "{a: 1}", "-1", "-2", "0", "4294967296", "18446744073709551616",
    "99999999999999999999999999", "-99999999999999999999", "1.5", "1e400", '"7"', "true", "2001-12-14",
    "!!binary aGVsbG8=", "&a [*a]", "|\n  block\n  text", "'[/]'", "\"\\0\"",
]  # fmt: skip

JSON_VALUES = [
    None, True, False, 0, -1, -2, 1.5, 2**32, 2**64, 10**30, -(10**30), 1e400, float("nan"), "7", "no", "",
    [], {}, [1], {"a": 1}, "\u0000", "x" * 10_000,
]  # fmt: skip


PLAN_KEYS = {"sampler", "schedule", "sigmas", "steps"}


def _check(result, path, *where: str) -> None:
    """Runs, or one clean error naming the file and where in it; exit 2/3, never 1, never a traceback."""
    out = result.output
    assert "Traceback" not in out, out
    assert result.exit_code in (0, 2, 3), f"exit {result.exit_code}: {out}"
    if result.exit_code:
        line = assert_clean_error(result, result.exit_code, str(path))
        assert any(w in line for w in where), f"{where} not in {line!r}"


def test_yaml_config_values_fuzz(tmp_path):
    path = tmp_path / "c.yaml"
    failures = 0
    for key in sorted(FIELDS):
        for value in YAML_VALUES:
            path.write_text(f"{key}: {value}\n", encoding="utf-8")
            # --print-config resolves and checks the config only; the sampler-related keys need the plan too
            mode = "--dry-run" if key in PLAN_KEYS else "--print-config"
            result = cli("generate", "x", "--config", path, mode)
            _check(result, path, f"'{key}'")
            failures += result.exit_code != 0
    assert failures > len(FIELDS) * len(YAML_VALUES) // 2  # most of these are errors


def _yaml_documents() -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    docs = [
        ("unknown key", b"stepz: 20\n"),
        ("non-string key", b"1: 2\n"),
        ("null key", b"~: 2\n"),
        ("list key", b"? [a, b]\n: 1\n"),
        ("top-level list", b"- steps\n- 20\n"),
        ("top-level scalar", b"20\n"),
        ("not UTF-8", "steps: 20\nnegative: caf\u00e9\n".encode("latin-1")),
        ("UTF-16", "steps: 20\n".encode("utf-16")),
        ("NUL byte", b"steps: 2\x000\n"),
        ("tab indent", b"steps:\n\t20\n"),
        ("unclosed", b"negative: [a, b\n"),
        ("duplicate key", b"steps: 20\nsteps: 30\n"),
        ("python tag", b"steps: !!python/object/apply:os.system ['echo pwned']\n"),
        ("deep nesting", b"negative: " + b"[" * 5000 + b"]" * 5000 + b"\n"),
        ("deep mapping", b"negative:" + b"".join(b"\n" + b"  " * i + b"a:" for i in range(1, 300)) + b" 1\n"),
        ("billion laughs", b"negative: [&a [x, x, x, x, x, x, x, x, x], "  # 9**9 items if ever expanded
                           + b"".join(f"&{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}], ".encode()
                                      for p, c in zip("abcdefgh", "bcdefghi"))
                           + b"*i]\n"),
        ("huge line", b"negative: " + b"x" * 2_000_000 + b"\n"),
        # round 3: the keys added since (ControlNet units, SDXL sizes, refiner, ray) under the same abuse
        ("unit alias bomb", b"controlnets: &a [{model: m, image: i}, *a]\n"),
        ("units laughs", b"controlnets: [&a {model: m, image: i}, " + b", ".join([b"*a"] * 5000) + b"]\n"),
        ("unit set tag", b"controlnets: [!!set {a, b}]\n"),
        ("unit nested deep", b"controlnets: [{model: m, image: i, weight: " + b"[" * 5000 + b"]" * 5000 + b"}]\n"),
        ("custom tag", b"refiner: !foo bar\n"),
        ("timestamp tag", b"seed: !!timestamp 2001-12-14\n"),
        ("size not a pair", b"original_size: 1024x1024x3\n"),
        ("size huge", b"target_size: 99999999x1\n"),
        ("ray a mapping", b"ray: {address: auto}\n"),
    ]  # fmt: skip
    for i in range(40):  # random bytes that start like a config
        docs.append((f"random {i}", b"steps: " + rng.randbytes(rng.randrange(1, 64))))
    return docs


@pytest.mark.parametrize("label, data", _yaml_documents(), ids=[d[0] for d in _yaml_documents()])
def test_malformed_yaml_documents(tmp_path, label, data):
    path = tmp_path / "c.yaml"
    path.write_bytes(data)
    result = cli("generate", "x", "--config", path, "--dry-run")
    _check(result, path, str(path))
    assert not (tmp_path / "pwned").exists()


def test_jsonl_values_fuzz(tmp_path):
    path = tmp_path / "jobs.jsonl"
    failures = 0
    for key in sorted(FIELDS):
        for value in JSON_VALUES:
            line = json.dumps({"prompt": "a cat", key: value})
            path.write_text("a plain prompt\n# comment\n" + line + "\n", encoding="utf-8")
            result = cli("generate", "--prompts-file", path, "--dry-run")
            _check(result, path, f"{path}:3")
            failures += result.exit_code != 0
    assert failures > len(FIELDS) * len(JSON_VALUES) // 2


def _jsonl_lines() -> list[tuple[str, bytes]]:
    rng = random.Random(11)
    lines = [
        ("not json", b"{prompt: a cat}"),
        ("trailing comma", b'{"prompt": "a", }'),
        ("array line", b'{"prompt": "a"} [1]'),
        ("not an object", b"{" + b'"a"' + b"}"),
        ("no prompt", b'{"seed": 1}'),
        ("prompt not text", b'{"prompt": 7}'),
        ("prompt list", b'{"prompt": ["a", "b"]}'),
        ("per-run key", b'{"prompt": "a", "model": "x.safetensors"}'),
        ("unknown key", b'{"prompt": "a", "stepz": 3}'),
        ("raw NUL", b'{"prompt": "a\x00b"}'),
        ("not UTF-8", b'{"prompt": "caf\xe9"}'),
        ("deep nesting", b'{"prompt": "a", "negative": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("huge number", b'{"prompt": "a", "seed": 1' + b"0" * 5000 + b"}"),
        ("NaN literal", b'{"prompt": "a", "cfg": NaN}'),
        ("Infinity", b'{"prompt": "a", "steps": Infinity}'),
        ("bad sampler", b'{"prompt": "a", "sampler": "no"}'),
        ("bad schedule", b'{"prompt": "a", "schedule": "on"}'),
        ("bad sigmas", b'{"prompt": "a", "sigmas": "1,2,x"}'),
        ("unit nested", b'{"prompt": "a", "controlnets": [{"model": "m", "image": "i", "weight": [[[[1]]]]}]}'),
        ("unit deep", b'{"prompt": "a", "controlnets": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("unit not a list", b'{"prompt": "a", "controlnets": {"model": "m"}}'),
        ("unit bad resize", b'{"prompt": "a", "controlnets": [{"model": "m", "image": "i", "resize": "\\u202e"}]}'),
        ("ray per job", b'{"prompt": "a", "ray": "auto"}'),
        ("size per job", b'{"prompt": "a", "crop_coords": "-1,0"}'),
    ]  # fmt: skip
    for i in range(30):
        lines.append((f"random {i}", b'{"prompt": "a", "seed": ' + rng.randbytes(rng.randrange(1, 32))))
    return lines


@pytest.mark.parametrize("label, data", _jsonl_lines(), ids=[d[0] for d in _jsonl_lines()])
def test_malformed_jsonl_lines(tmp_path, label, data):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b'{"prompt": "fine", "seed": 3}\n\n' + data + b"\n")
    result = cli("generate", "--prompts-file", path, "--dry-run")
    _check(result, path, f"{path}:3", f"{path}: not UTF-8")
    assert result.exit_code != 0, f"{label} was accepted"


@pytest.mark.parametrize("seed", ["-2", str(2**32), str(2**64), "99999999999999999999999"])
def test_seed_out_of_range_on_the_command_line(seed):
    assert_clean_error(cli("generate", "x", "--seed", seed, "--dry-run"), 2, "seed")

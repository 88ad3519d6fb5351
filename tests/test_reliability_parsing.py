"""Parsing what others wrote (issue 12, items 6-10), through the real command: values read from an image, a prompts
file or a config are checked exactly like flags (exit 3 naming the file and key or line, never blaming an option
the user did not pass); ComfyUI graphs are walked without hanging; A1111 prompt syntax as A1111's current parser
reads it; a BOM and invalid UTF-8 found before the model loads; odd output names and closed streams are one-line
errors with the documented code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdcli.text.prompts import BREAK, check_prompt, chunk_prompt, parse_attention

INFOTEXT = "a cat\nNegative prompt: blurry\n{pairs}"
PAIRS = "Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64, Model: x"


def _png(path, chunks: dict[str, str]):
    info = PngInfo()
    for key, value in chunks.items():
        info.add_itxt(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def _a1111(tmp_path, pairs: str):
    return _png(tmp_path / "in.png", {"parameters": INFOTEXT.format(pairs=pairs)})


def _replay(png, *extra):
    return cli("generate", "--from-image", png, "--dry-run", "--json", *extra)


# ---------------------------------------------------------------- item 6: one typed validation


def test_sampler_help_in_a_replayed_image_is_an_error_not_the_list(tmp_path):
    png = _a1111(tmp_path, PAIRS.replace("Euler", "help"))
    result = _replay(png)
    assert_clean_error(result, 3, "in.png", "'sampler'", "help")
    assert "euler" not in result.stdout.lower()


def test_sampler_help_in_a_prompts_file_or_config_names_the_line_or_key(tmp_path):
    (tmp_path / "p.txt").write_text('a dog\n{"prompt": "a cat", "sampler": "help"}\n')
    assert_clean_error(cli("generate", "--prompts-file", "p.txt", "--dry-run"), 3, "p.txt:2", "'sampler'")
    (tmp_path / "c.yaml").write_text("sampler: help\n")
    assert_clean_error(cli("generate", "x", "-c", "c.yaml", "--dry-run"), 3, "c.yaml", "'sampler'")


def test_unknown_sampler_in_an_image_is_bad_input_naming_the_image(tmp_path):
    png = _a1111(tmp_path, PAIRS.replace("Euler", "Warp Drive"))
    assert_clean_error(_replay(png), 3, "in.png (metadata): 'sampler'", "Warp Drive")
    assert_clean_error(_replay(png, "--sampler", "nope"), 2, "option --sampler")  # the flag wins, and is blamed


def test_sampler_help_on_the_command_line_still_lists_them():
    result = cli("generate", "x", "--sampler", "help")
    assert result.exit_code == 0 and "euler" in result.stdout.lower()


@pytest.mark.parametrize("pair, key", [("Seed: 1e400", "'seed'"), ("Steps: inf", "'steps'"),
                                        ("Steps: -inf", "'steps'"), ("Seed: " + "9" * 5000, "'seed'"),
                                        ("CFG scale: nan", "'cfg'"), ("Steps: 7.5", "'steps'")])
def test_overflowing_numbers_in_an_infotext_are_range_errors(tmp_path, pair, key):
    label = pair.split(":")[0]
    pairs = ", ".join(p for p in PAIRS.split(", ") if not p.startswith(label)) + ", " + pair
    assert_clean_error(_replay(_a1111(tmp_path, pairs)), 3, "in.png", key)


def _sdcli_png(tmp_path, **fields):
    record = {"prompt": "a cat", "mode": "txt2img", "config": {"steps": 2, "seed": 3}, "dtype": "fp32",
              "model": {"sha256": None}, **fields}
    return _png(tmp_path / "ours.png", {"sdcli": json.dumps(record)})


@pytest.mark.parametrize("field, value", [("config", ["steps", 3]), ("loras", "detail.safetensors"),
                                          ("loras", [{"name": 3}]), ("prompt", 42), ("mode", "paint"),
                                          ("dtype", "fp8"), ("dtype", "auto"), ("model", "x")])
def test_wrong_types_in_our_own_json_chunk_name_the_file_and_key(tmp_path, field, value):
    png = _sdcli_png(tmp_path, **{field: value})
    for result in (_replay(png), cli("verify", png, "-m", "nope.safetensors")):
        line = assert_clean_error(result, 3, "ours.png", f"'{field}'")
        assert "option" not in line  # never blamed on a flag the user did not pass


def test_wrong_types_inside_the_recorded_config_name_the_key(tmp_path):
    png = _sdcli_png(tmp_path, config={"steps": "many", "seed": 3})
    assert_clean_error(_replay(png), 3, "ours.png", "'steps'")


# ---------------------------------------------------------------- item 7: ComfyUI graphs


def _ksampler(**inputs):
    return {"class_type": "KSampler", "inputs": {"seed": 4, "steps": 3, "cfg": 7.0, "sampler_name": "euler",
                                                 "scheduler": "normal", **inputs}}


def _deep(levels: int) -> str:
    return '{"1": {"class_type": "KSampler", "inputs": {"seed": 1, "x": ' + "[" * levels + "]" * levels + "}}}"


COMFY_GRAPHS = {
    "self-linked": json.dumps({"1": _ksampler(positive=["2", 0], model=["2", 0], latent_image=["2", 0]),
                               "2": {"class_type": "LoraLoader", "inputs": {"model": ["2", 0],
                                                                            "conditioning": ["2", 0]}}}),
    "cycle": json.dumps({"1": _ksampler(positive=["2", 0], negative=["3", 0]),
                         "2": {"class_type": "A", "inputs": {"conditioning": ["3", 0]}},
                         "3": {"class_type": "B", "inputs": {"conditioning": ["2", 0], "model": ["1", 0]}}}),
    "long chain": json.dumps({"1": _ksampler(positive=["n0", 0]),
                              **{f"n{i}": {"inputs": {"conditioning": [f"n{i + 1}", 0]}} for i in range(5000)}}),
    "non-object nodes": json.dumps({"1": _ksampler(positive=["2", 0], negative=["3", 0], model=[None, 0]),
                                    "2": "text", "3": [1, 2], "4": None, "5": {"inputs": [1]}}),
    "inputs not an object": json.dumps({"1": {"class_type": "KSampler", "inputs": ["seed", 4]}}),
    "bad links": json.dumps({"1": _ksampler(positive=[], negative=[{"a": 1}, 0], model=[True, 0],
                                            latent_image=[[["x"]], 0])}),
    "deep nesting": _deep(100_000),
    "huge integer": '{"1": {"class_type": "KSampler", "inputs": {"seed": 1' + "0" * 5000 + "}}}",
}


@pytest.mark.parametrize("label", list(COMFY_GRAPHS))
def test_hostile_comfyui_graphs_neither_hang_nor_crash(tmp_path, label):
    png = _png(tmp_path / "comfy.png", {"prompt": COMFY_GRAPHS[label]})
    started = time.monotonic()
    inspected = cli("inspect", png, "--json")
    replayed = _replay(png)
    assert time.monotonic() - started < 20
    assert inspected.exit_code == 0, inspected.output
    assert replayed.exit_code in (0, 3), replayed.output  # 3: no usable settings, said in one line
    if replayed.exit_code:
        assert_clean_error(replayed, 3, "comfy.png")


def test_comfyui_workflow_with_non_object_nodes(tmp_path):
    workflow = {"nodes": ["x", None, 3, {"type": "KSampler", "widgets_values": [1, "fixed", 2, 7, "euler", "normal"]},
                          {"type": "CLIPTextEncode", "widgets_values": "not a list"}]}
    png = _png(tmp_path / "wf.png", {"workflow": json.dumps(workflow)})
    assert cli("inspect", png, "--json").exit_code == 0
    png = _png(tmp_path / "wf2.png", {"workflow": json.dumps({"nodes": "abc"})})
    assert cli("inspect", png, "--json").exit_code == 0


# ---------------------------------------------------------------- item 8: A1111 prompt syntax


@pytest.mark.parametrize("text", ["(word: 1.5)", "(word:1.5 )", "(word:  1.5  )", "(word:1.5)"])
def test_spaces_around_a_weight_as_a1111_reads_them(text):
    """A1111 master's re_attention: `:\\s*([+-]?[.\\d]+)\\s*\\)`."""
    assert parse_attention(text) == [("word", 1.5)]


def test_break_is_recognised_by_its_text_never_by_a_weight_of_minus_one():
    assert parse_attention("(cat:-1) dog") == [("cat", -1.0), (" dog", 1.0)]
    assert parse_attention("(cat:-1)")[0] is not BREAK
    # Text weighted -1 that reads "BREAK" after merging is still a word, not a chunk break.
    pieces = parse_attention("(BRE\\AK:-1)")
    assert all(p is not BREAK for p in pieces)

    class Tok:
        bos_id, eos_id = 1, 2

        def encode(self, text):
            return [ord(c) for c in text]

    assert len(chunk_prompt("(cat:-1) BREAK (dog:-1)", Tok(), 0)) == 2
    assert len(chunk_prompt("(BRE\\AK:-1)", Tok(), 0)) == 1


def test_infotext_says_rng_cpu_and_replay_takes_the_rng(tiny_sd1, tmp_path):
    """sdcli writes its noise source; a replay draws the source the image names (issue 29: GPU and NV too), and
    only a source A1111 does not have is flagged."""
    result = cli(*render_args(tiny_sd1, "-o", "a.png"))
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "a.png") as img:
        assert ", RNG: CPU, " in img.text["parameters"]
    for pairs, source in ((PAIRS + ", RNG: GPU", "gpu"), (PAIRS, "gpu"), (PAIRS + ", RNG: CPU", "cpu"),
                          (PAIRS + ", RNG: NV", "nv")):
        replayed = _replay(_a1111(tmp_path, pairs))
        assert json.loads(replayed.stdout.splitlines()[0])["config"]["rng"] == source
        assert "different image" not in replayed.stderr
    odd = _replay(_a1111(tmp_path, PAIRS + ", RNG: quantum"))
    assert "RNG: quantum" in odd.stderr and "different image" in odd.stderr


def test_inspect_prompt_shows_the_editing_schedule():
    result = cli("inspect", "--prompt", "a [day:night:0.5] sky")
    assert result.exit_code == 0, result.output
    assert "until step 10 of 20: a day sky" in result.stdout and "until step 20 of 20: a night sky" in result.stdout
    assert "0.909" not in result.stdout  # not the de-emphasised editing syntax
    report = json.loads(cli("inspect", "--prompt", "a [day:night:0.5] sky", "--json").stdout)
    assert report["prompt_schedule"] == [{"until_step": 10, "text": "a day sky"},
                                         {"until_step": 20, "text": "a night sky"}]


def test_schedule_numbers_that_overflow_and_deep_brackets_do_not_crash():
    result = cli("generate", "[a:b:1e400] [c:d:-1e400] " + "([" * 3000 + "[x:y:0.5]", "--dry-run")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- item 9: BOM and UTF-8


def test_bom_before_a_json_first_line_is_dropped(tmp_path):
    (tmp_path / "p.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "a cat", "seed": 77, "steps": 3}\n')
    result = cli("generate", "--prompts-file", "p.jsonl", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout.splitlines()[0])
    assert plan["prompt"] == "a cat" and plan["config"]["seed"] == 77 and plan["config"]["steps"] == 3


def test_invalid_utf8_in_a_prompts_file_names_the_line_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("sdcli.loading.checkpoint.load_models", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "p.txt").write_bytes(b"a dog\n# note\ncaf\xe9 au lait\n")
    assert_clean_error(cli("generate", "--prompts-file", "p.txt", "-m", "x.safetensors"), 3, "p.txt:3", "UTF-8")
    (tmp_path / "c.yaml").write_bytes(b"steps: 3\nnegative: caf\xe9\n")
    assert_clean_error(cli("generate", "x", "-c", "c.yaml", "--dry-run"), 3, "c.yaml:2", "UTF-8")


def test_invalid_utf8_in_the_prompt_argument_or_stdin(tmp_path):
    """Real processes: argv and stdin bytes that are not UTF-8."""
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"), PYTHONUTF8="0", LC_ALL="C.UTF-8")
    argv = [sys.executable.encode(), b"-m", b"sdcli", b"generate", b"caf\xe9", b"--dry-run"]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.decode(errors="replace").strip().splitlines() == ["error: PROMPT: not valid UTF-8 text"]
    proc = subprocess.run([sys.executable, "-m", "sdcli", "generate", "--prompts-file", "-", "--dry-run"],
                          cwd=tmp_path, env=env, input=b"ok\ncaf\xe9\n", capture_output=True, timeout=60)
    assert proc.returncode == 3 and b"<stdin>:2" in proc.stderr and b"Traceback" not in proc.stderr


def test_invalid_utf8_in_a_negative_flag_is_a_usage_error():
    assert_clean_error(cli("generate", "x", "--negative", "caf\udce9", "--dry-run"), 2, "--negative", "UTF-8")


# ---------------------------------------------------------------- item 10: clear errors, parsing side


def test_huge_width_specifier_is_a_usage_error_at_once():
    started = time.monotonic()
    assert_clean_error(cli("generate", "x", "-o", "{index:999999999d}.png", "-m", "x.safetensors"), 2, "width")
    assert_clean_error(cli("generate", "x", "-o", "{index:{seed}d}.png", "-m", "x.safetensors"), 2, "{index")
    assert time.monotonic() - started < 5


def test_output_names_that_cannot_work_fail_before_the_model_loads(tiny_sd1, tmp_path, monkeypatch):
    monkeypatch.setattr("sdcli.loading.checkpoint.load_models", lambda *a, **k: pytest.fail("model loaded"))
    assert_clean_error(cli(*render_args(tiny_sd1, "-o", "x" * 300 + ".png")), 7, "255")
    (tmp_path / "existing_dir").mkdir()
    assert_clean_error(cli(*render_args(tiny_sd1, "-o", "existing_dir")), 7, "existing_dir", "folder")
    assert_clean_error(cli(*render_args(tiny_sd1, "-o", "existing_dir", "--overwrite")), 7, "folder")
    assert_clean_error(cli(*render_args(tiny_sd1, "-o", "newdir/")), 2, "newdir/", "folder")
    assert not (tmp_path / "newdir").exists()


def test_verify_min_psnr_nan_is_a_usage_error(tmp_path):
    png = _sdcli_png(tmp_path)
    assert_clean_error(cli("verify", png, "--min-psnr", "nan", "-m", "x.safetensors"), 2, "--min-psnr")


@pytest.mark.parametrize("prompt", ["(cat:1" + "0" * 60 + ")", "(cat:-1" + "0" * 400 + ")", "(cat:99999)"])
def test_huge_prompt_weight_is_refused_not_blamed_on_the_checkpoint(tiny_sd1, prompt):
    args = render_args(tiny_sd1, "-o", "a.png")
    args[1] = prompt
    line = assert_clean_error(cli(*args), 3, "prompt weight", "out of range")
    assert "NaN" not in line


def test_huge_weight_in_a_prompts_file_names_the_line(tmp_path):
    (tmp_path / "p.txt").write_text("a\nb\n(cat:1" + "0" * 60 + ")\n")
    assert_clean_error(cli("generate", "--prompts-file", "p.txt", "--dry-run"), 3, "p.txt:3", "prompt weight")


def test_bad_lora_tag_on_line_3_of_a_prompts_file_is_named_with_its_line(tmp_path):
    (tmp_path / "p.txt").write_text("a dog\n\n<lora:x:abc> a cat\n")
    assert_clean_error(cli("generate", "--prompts-file", "p.txt", "--dry-run"), 3, "p.txt:3", "<lora:x:abc>")
    (tmp_path / "q.txt").write_text("a dog\n<hypernet:x:1> a cat\n")
    assert_clean_error(cli("generate", "--prompts-file", "q.txt", "--dry-run"), 8, "q.txt:2", "hypernet")


def test_check_prompt_keeps_the_error_class_and_adds_where():
    with pytest.raises(Exception, match=r"^f\.txt:4: prompt tag"):
        check_prompt("<lora:x:nan>", "f.txt:4")


def _closed(args, tmp_path, fd: int):
    env = dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    close = {0: "<&-", 1: ">&-"}[fd]
    command = " ".join([sys.executable, "-m", "sdcli", *args]) + f" {close}"
    return subprocess.run(["sh", "-c", command], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                          stdout=subprocess.PIPE if fd != 1 else None, timeout=60)


def test_closed_stdin_and_stdout_are_one_line_errors(tmp_path):
    proc = _closed(["generate", "--prompts-file", "-", "--dry-run"], tmp_path, 0)
    assert proc.returncode == 3 and proc.stderr.decode().strip() == "error: --prompts-file -: stdin is closed"
    for args in (["generate", "x", "-o", "-", "-m", "x.safetensors"], ["generate", "x", "--dry-run"],
                 ["inspect", "--prompt", "x"], ["--help"]):
        proc = _closed(args, tmp_path, 1)
        err = proc.stderr.decode()
        assert proc.returncode == 7, (args, err)
        assert err.strip().splitlines() == ["error: stdout is closed: nowhere to write the output "
                                            "(redirect it, or drop -o - / --json)"], (args, err)


# ---------------------------------------------------------------- a small metadata fuzzer (fixed seed, bounded)

_VALUES = ["help", "inf", "-inf", "nan", "1e400", "-1", "0", "7.5", "", " ", "x" * 300, "9" * 400, "\u00e9\u732b",
           '"quoted, value"', "1,2", "null", "[1]", "{}", "DPM++ 2M Karras", "euler_a karras"]
_LABELS = ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model hash", "Denoising strength",
           "Clip skip", "RNG", "Version", "Hires upscale"]
_JSON_VALUES = [None, True, 0, -1, 1.5, 1e308, "x", "help", [], [1, "a"], {}, {"a": [None]}, 2**70]


def _fuzz_chunks(rng) -> dict[str, str]:
    kind = rng.choice(["a1111", "sdcli", "comfy", "workflow"])
    if kind == "a1111":
        pairs = ", ".join(f"{rng.choice(_LABELS)}: {rng.choice(_VALUES)}" for _ in range(rng.randrange(3, 9)))
        return {"parameters": f"{rng.choice(_VALUES)}\nNegative prompt: {rng.choice(_VALUES)}\n{pairs}"}
    if kind == "sdcli":
        keys = ["prompt", "mode", "config", "loras", "model", "dtype", "seed"]
        record = {k: rng.choice(_JSON_VALUES) for k in rng.sample(keys, rng.randrange(1, len(keys)))}
        if rng.random() < 0.5:
            record["config"] = {k: rng.choice(_JSON_VALUES) for k in rng.sample(
                ["steps", "seed", "sampler", "cfg", "width", "negative", "bogus"], 3)}
        return {"sdcli": json.dumps(record)}
    if kind == "comfy":
        ids = [str(i) for i in range(6)]
        graph = {i: rng.choice([_ksampler(positive=[rng.choice(ids), 0], model=[rng.choice(ids), 0]),
                                {"inputs": {"conditioning": [rng.choice(ids), 0], "text": rng.choice(_JSON_VALUES)}},
                                rng.choice(_JSON_VALUES)]) for i in ids}
        return {"prompt": json.dumps(graph)}
    nodes = [rng.choice([{"type": "KSampler", "widgets_values": [rng.choice(_JSON_VALUES) for _ in range(7)]},
                         {"type": "CLIPTextEncode", "widgets_values": rng.choice(_JSON_VALUES)},
                         rng.choice(_JSON_VALUES)]) for _ in range(4)]
    return {"workflow": json.dumps({"nodes": nodes})}


def test_png_metadata_fuzz_never_crashes(tmp_path):
    """150 random metadata blocks (seed 12): inspect always succeeds; a replay succeeds or is one exit-3 line."""
    import random

    rng = random.Random(12)
    outcomes = set()
    for i in range(150):
        png = _png(tmp_path / f"f{i}.png", _fuzz_chunks(rng))
        assert cli("inspect", png, "--json").exit_code == 0
        result = _replay(png)
        if result.exit_code != 0:
            assert_clean_error(result, 3, f"f{i}.png")
        outcomes.add(result.exit_code)
    assert outcomes == {0, 3}

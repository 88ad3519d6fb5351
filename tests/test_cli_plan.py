"""Issue 30, items 11 and 12 through the real commands: --dry-run's readable plan and its JSON (the seeds it
prints are the ones the run then records), img2img's -W/-H, hires fix and --dry-run, sweep's --json and
--print-config, and the one JSON envelope (kind, path first) of every command's --json lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from _fixtures_reliability import *  # noqa: F403


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def enveloped(result, *kinds: str) -> list[dict]:
    """The --json lines, each checked to open with the envelope: kind (one of `kinds`), then path."""
    found = lines(result)
    assert found, (result.stdout, result.stderr)
    for line in found:
        assert list(line)[:2] == ["kind", "path"] and line["kind"] in kinds, line
    return found


def fast(model, *extra: str, prompt: str = "a cat") -> list[str]:
    """render_args with this prompt and without its seed (the tests choose theirs)."""
    args = render_args(model, *extra)
    i = args.index("--seed")
    return ["generate", prompt, *args[2:i], *args[i + 2:]]


def plan_of(*args: str) -> list[dict]:
    result = cli(*args, "--dry-run", "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    return enveloped(result, "plan")


# --- item 12: --dry-run ----------------------------------------------------------------------------------------------

def test_dry_run_is_a_readable_summary_by_default(tiny_sd1, monkeypatch):
    monkeypatch.setattr("sdcli.loading.checkpoint.load_models", lambda *a, **k: pytest.fail("model loaded"))
    result = cli(*fast(tiny_sd1, "--seed", "7", "-n", "2", "-o", "out/{index}-{seed}.png", "--steps", "4",
                       "--negative", "blurry", "--dry-run", prompt="a [day:night:0.5] (cat:1.2)"))
    assert result.exit_code == 0, result.output
    text = result.stdout
    with pytest.raises(json.JSONDecodeError):
        json.loads(text.splitlines()[0])
    assert "writes:    out/0-7.png, out/1-8.png" in text
    assert "seeds:     7, 8" in text and "size:      64x64" in text
    assert "sampler:   euler, schedule normal, 4 steps" in text
    assert "sigmas:    " in text and "until step 2: 'a day (cat:1.2)'" in text
    assert "tokens:    3 in 1 chunk of 75 (3): a</w> night</w> cat</w>" in text
    assert "negative:  1 in 1 chunk of 75 (1)" in text
    assert "note:" not in text  # the model's header was read: its own family, no assumption to note
    assert not Path("out").exists()


def test_dry_run_json_has_token_counts_not_padded_arrays(tiny_sd1):
    long_prompt = " ".join(["cat"] * 80)
    (plan,) = plan_of(*fast(tiny_sd1, "--seed", "3", "--steps", "4", prompt=long_prompt))
    tokens = plan["tokens"]
    assert tokens["n_tokens"] == 80 and tokens["per_chunk"] == [75, 5] and tokens["n_chunks"] == 2
    assert len(tokens["ids"]) == 80 + 2  # begin, the prompt, end: no padding
    for chunk in tokens["chunks"]:
        assert set(chunk) == {"n_tokens", "tokens", "embeddings"} and len(chunk["tokens"]) == chunk["n_tokens"]
    assert 77 not in _list_lengths(plan)  # no array padded to the text encoder's 77 places
    assert plan["seeds"] == [3] and plan["size"] == [64, 64] and len(plan["sigmas"]) == 5


def _list_lengths(value) -> set[int]:
    if isinstance(value, dict):
        return set().union(*(_list_lengths(v) for v in value.values()))
    if isinstance(value, list):
        return {len(value)}.union(*(_list_lengths(v) for v in value))
    return set()


@pytest.mark.parametrize("variation, seeds, subseeds", [
    ([], [11, 12, 13], None),  # image k: seed + k
    (["--subseed", "40", "--subseed-strength", "0.3"], [11, 11, 11], [40, 41, 42]),  # A1111: subseed + k
])
def test_dry_run_seeds_are_the_seeds_the_run_records(tiny_sd1, variation, seeds, subseeds):
    args = fast(tiny_sd1, "--seed", "11", "-n", "3", "--batch-size", "2", "-o", "s/{index}.png", *variation)
    (plan,) = plan_of(*args)
    assert cli(*args).exit_code == 0
    recorded = [sdcli_meta(f"s/{i}.png") for i in range(3)]
    assert plan["seeds"] == [m["seed"] for m in recorded] == seeds
    if subseeds is not None:
        assert plan["subseeds"] == [m["config"]["subseed"] for m in recorded] == subseeds
    assert [o["path"] for o in plan["outputs"]] == [f"s/{i}.png" for i in range(3)]


def test_dry_run_never_prints_a_random_seed_as_a_number(tiny_sd1):
    (plan,) = plan_of(*fast(tiny_sd1, "-n", "2", "-o", "r/{seed}.png"))
    assert plan["seeds"] is None and plan["config"]["seed"] == -1
    assert [o["path"] for o in plan["outputs"]] == ["r/{seed}.png", "r/{seed}.png"]
    text = cli(*fast(tiny_sd1), "--dry-run").stdout
    assert "seeds:     random: drawn when the run starts; give --seed N to fix it" in text


def test_dry_run_of_a_resume_prints_the_recorded_seed_the_run_then_uses(tiny_sd1):
    args = fast(tiny_sd1, "-n", "3", "-o", "i/{index}.png")
    assert cli(*args).exit_code == 0  # a random-seed run...
    seed = sdcli_meta("i/0.png")["seed"]
    Path("i/2.png").unlink()  # ...that did not finish
    (plan,) = plan_of(*args, "--skip-existing")
    assert plan["seeds"] == [seed, seed + 1, seed + 2]
    assert [o.get("skipped", False) for o in plan["outputs"]] == [True, True, False]
    assert cli(*args, "--skip-existing").exit_code == 0
    assert sdcli_meta("i/2.png")["seed"] == plan["seeds"][2]


def test_dry_run_without_a_model_assumes_sd1_and_says_so():
    text = cli("generate", "a cat", "--dry-run").stdout
    assert "size:      512x512 (SD 1.x's native size; the model was not read)" in text
    assert "note:      no model given: SD1's tokenizer and schedule" in text


# --- item 11: img2img's -W/-H, hires fix and --dry-run -----------------------------------------------------------

@pytest.fixture
def picture(tmp_path):
    Image.new("RGB", (80, 64), (180, 40, 20)).save(tmp_path / "in.png")
    return "in.png"


def img2img(model, picture, *extra: str) -> list[str]:
    return ["img2img", "a cat", "-i", picture, "--model", str(model), "--steps", "2", "--sampler", "euler",
            "--seed", "5", "--dtype", "fp32", "--device", "cpu", "--strength", "0.5", *extra]


def test_img2img_dry_run_shows_the_picture_size_and_the_sigmas_it_runs(tiny_sd1, picture):
    (plan,) = plan_of(*img2img(tiny_sd1, picture, "--steps", "10", "-W", "64"))
    assert plan["size"] == [64, 48]  # -W alone: the aspect ratio kept, rounded to a multiple of 8
    assert len(plan["sigmas"]) == 5 + 1  # strength 0.5 of 10 steps: the last 5
    assert plan["seeds"] == [5] and plan["outputs"][0]["path"] == "sdcli-5.png"
    assert not Path("sdcli-5.png").exists()


def test_img2img_width_and_height_resize_the_picture_and_verify_replays_it(tiny_sd1, picture):
    assert cli(*img2img(tiny_sd1, picture, "-W", "64", "-H", "96", "-o", "wh.png")).exit_code == 0
    with Image.open("wh.png") as img:
        assert img.size == (64, 96)
    assert cli(*img2img(tiny_sd1, picture, "-H", "96", "-o", "h.png")).exit_code == 0
    with Image.open("h.png") as img:
        assert img.size == (120, 96)  # -H alone: the aspect ratio kept
    result = cli("verify", "wh.png", "-m", str(tiny_sd1), "-i", picture, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    (line,) = enveloped(result, "verify")
    assert line["path"] == "wh.png" and line["passed"]


def test_img2img_hires_fix_doubles_the_size_and_replays(tiny_sd1, picture):
    result = cli(*img2img(tiny_sd1, picture, "--hires-scale", "2", "--hires-steps", "2", "-o", "hi.png"))
    assert result.exit_code == 0, result.output
    with Image.open("hi.png") as img:
        assert img.size == (160, 128)
    assert sdcli_meta("hi.png")["config"]["hires_scale"] == 2.0
    verify = cli("verify", "hi.png", "-m", str(tiny_sd1), "-i", picture, "--device", "cpu")
    assert verify.exit_code == 0, verify.output
    Image.new("L", (80, 64), 255).save("mask.png")
    assert_clean_error(cli(*img2img(tiny_sd1, picture, "--hires-scale", "2", "--mask", "mask.png")), 2,
                       "--hires-scale", "--mask")


HIRES_KEYS = ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler")


def _configs(user: str, given: str) -> None:
    """A user config ($XDG_CONFIG_HOME/sdcli/config.yaml) and c.yaml, for --config."""
    Path("xdg/sdcli").mkdir(parents=True, exist_ok=True)
    Path("xdg/sdcli/config.yaml").write_text(user)
    Path("c.yaml").write_text(given)


def test_img2img_takes_the_hires_keys_from_the_configs_as_generate_does(tiny_sd1, picture):
    """command line > --config file > user config > defaults, for every hires key (img2img used to drop a
    config's hires_scale: the hires fix came only from its flag)."""
    _configs("hires_scale: 1.5\nhires_steps: 1\n", "hires_scale: 2\nhires_strength: 0.3\n")
    assert cli(*img2img(tiny_sd1, picture, "-o", "user.png")).exit_code == 0
    assert cli(*img2img(tiny_sd1, picture, "-c", "c.yaml", "-o", "file.png")).exit_code == 0
    assert cli(*img2img(tiny_sd1, picture, "-c", "c.yaml", "--hires-scale", "1", "-o", "flag.png")).exit_code == 0
    expected = {"user.png": ((120, 96), 1.5, 0.5), "file.png": ((160, 128), 2.0, 0.3), "flag.png": ((80, 64), 1.0, 0.3)}
    for name, (size, scale, strength) in expected.items():  # the 80x64 picture, scaled
        with Image.open(name) as img:
            assert img.size == size, name
        config = sdcli_meta(name)["config"]
        assert (config["hires_scale"], config["hires_strength"], config["hires_steps"]) == (scale, strength, 1), name
    generated = cli(*fast(tiny_sd1, "-c", "c.yaml", "--seed", "5", "-o", "g.png"))
    assert generated.exit_code == 0, generated.output
    ours, theirs = sdcli_meta("file.png")["config"], sdcli_meta("g.png")["config"]
    assert all(ours.get(key) == theirs.get(key) for key in HIRES_KEYS)  # the same values as generate takes


def test_img2img_print_config_shows_the_hires_keys_the_run_uses_and_their_sources(tiny_sd1, picture):
    _configs("hires_scale: 1.5\nhires_upscaler: Lanczos\n", "hires_scale: 2\nhires_strength: 0.3\n")
    args = img2img(tiny_sd1, picture, "-c", "c.yaml", "--hires-steps", "1")
    (shown,) = enveloped(cli(*args, "--print-config", "--json"), "config")
    sources = shown["sources"]
    assert sources["hires_scale"] == sources["hires_strength"] == "--config c.yaml"
    assert sources["hires_upscaler"].startswith("user config ") and sources["hires_steps"] == "command line"
    yaml_text = cli(*args, "--print-config").stdout
    assert "hires_scale: 2.0  # --config c.yaml" in yaml_text and "hires_steps: 1  # command line" in yaml_text
    assert cli(*args, "-o", "run.png").exit_code == 0
    recorded = sdcli_meta("run.png")["config"]
    assert {key: recorded.get(key) for key in HIRES_KEYS} == {key: shown["config"][key] for key in HIRES_KEYS}


def test_a_configs_hires_scale_with_a_mask_is_refused_naming_the_file(tiny_sd1, picture):
    _configs("", "hires_scale: 2\n")
    Image.new("L", (80, 64), 255).save("mask.png")
    assert_clean_error(cli(*img2img(tiny_sd1, picture, "-c", "c.yaml", "--mask", "mask.png")), 2,
                       "c.yaml", "hires_scale", "--mask")
    assert not Path("sdcli-5.png").exists()
    ok = cli(*img2img(tiny_sd1, picture, "-c", "c.yaml", "--hires-scale", "1", "--mask", "mask.png", "-o", "m.png"))
    assert ok.exit_code == 0, ok.output  # the command line turns it off


# --- item 11: one JSON envelope --------------------------------------------------------------------------------------

def test_every_commands_json_lines_share_the_envelope(tiny_sd1):
    result = cli(*fast(tiny_sd1, "--seed", "2", "-n", "2", "-o", "g/{index}.png", "--grid", "grid.png", "--json"))
    images = enveloped(result, "image", "grid")
    assert [(l["kind"], l["path"]) for l in images] == [("image", "g/0.png"), ("image", "g/1.png"),
                                                        ("grid", "grid.png")]
    assert images[0]["seed"] == 2 and images[2]["seeds"] == [2, 3]
    (enc,) = enveloped(cli("encode", "g/0.png", "-m", str(tiny_sd1), "-o", "z.safetensors", "--device", "cpu",
                           "--json"), "latent")
    assert enc["path"] == "z.safetensors" and enc["shape"][0] == 1
    (dec,) = enveloped(cli("decode", "z.safetensors", "-m", str(tiny_sd1), "-o", "d.png", "--device", "cpu",
                           "--json"), "image")
    assert dec["path"] == "d.png" and dec["index"] == 0
    (up,) = enveloped(cli("upscale", "g/0.png", "-u", "Lanczos", "--scale", "2", "-o", "u.png", "--json"), "image")
    assert up["path"] == "u.png" and up["size"] == {"width": 128, "height": 128}
    (ver,) = enveloped(cli("verify", "g/0.png", "-m", str(tiny_sd1), "--device", "cpu", "--json"), "verify")
    assert ver["path"] == "g/0.png" and ver["passed"]
    (config,) = enveloped(cli(*fast(tiny_sd1), "--print-config", "--json"), "config")
    assert config["path"] is None and config["config"]["steps"] == 1


def test_sweep_json_lines_and_print_config(tiny_sd1):
    args = ["sweep", "a cat", "--model", str(tiny_sd1), "--steps", "1", "-W", "64", "-H", "64", "--sampler",
            "euler", "--seed", "1", "--dtype", "fp32", "--device", "cpu", "--x", "cfg=3,7", "--z", "steps=1,2",
            "-o", "plot.png", "--keep-cells", "cells"]
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    found = enveloped(result, "cell", "plot", "cells")
    cells = [l for l in found if l["kind"] == "cell"]
    assert sorted(l["path"] for l in cells) == sorted(f"cells/z{z}-y0-x{x}.png" for z in (0, 1) for x in (0, 1))
    assert all(l["seed"] == 1 for l in cells) and {l["settings"]["cfg"] for l in cells} == {3.0, 7.0}
    plots = [l for l in found if l["kind"] == "plot"]
    assert [(l["path"], l["cells"]) for l in plots] == [("plot-z0.png", 2), ("plot-z1.png", 2)]
    assert found[-1] == {"kind": "cells", "path": "plot.json", "cells": 4, "plots": ["plot-z0.png", "plot-z1.png"]}
    printed = cli(*args, "--print-config", "--overwrite")
    assert printed.exit_code == 0 and "steps: 1" in printed.stdout and "cfg:" in printed.stdout
    (config,) = enveloped(cli(*args, "--print-config", "--json"), "config")
    assert config["config"]["seed"] == 1

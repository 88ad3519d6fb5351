"""A1111's ``<lora:NAME:WEIGHT>`` in prompts: the tag is taken out of the text and names a LoRA file under
--lora-dir. A tagged render equals the same LoRA given with --lora; jobs of one prompts file switch LoRA sets and
each job renders as it would alone; unknown names, unsupported tags and bad weights fail before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from PIL import Image
from test_lora import lora_file, oracle  # noqa: F401 - the LoRA file and the model it was made for
from typer.testing import CliRunner

from sdcli.cli import app
from sdcli.runtime.errors import BadInputError, UnsupportedModelError
from sdcli.text.prompts import PromptLora, split_extra_networks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def run(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    base = ["-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "--steps", "2", "-W", "64", "-H", "64",
            "--sampler", "euler", "--seed", "9"]  # fmt: skip

    def invoke(*args: str, expect: int = 0, command: str = "generate"):
        result = CliRunner().invoke(app, [command, *args, *(base if command == "generate" else [])])
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return invoke


@pytest.fixture
def lora_dir(lora_file, tmp_path) -> Path:  # noqa: F811
    folder = tmp_path / "loras"
    (folder / "styles").mkdir(parents=True)
    (folder / "styles" / "detail_tweak.safetensors").write_bytes(lora_file[0].read_bytes())  # found in sub-folders
    return folder


def pixels(path: str) -> bytes:
    return Image.open(path).tobytes()


def test_split_extra_networks():
    assert split_extra_networks("a cat, <lora:x:0.8> by <LoRA:sub/y>") == (
        "a cat,  by ", [PromptLora("x", 0.8), PromptLora("sub/y", 1.0)])
    assert split_extra_networks("no tags (here:1.2) <3") == ("no tags (here:1.2) <3", [])
    for bad, error in [("<lora::1>", BadInputError), ("<lora:x:heavy>", BadInputError), ("<lora:x:nan>", BadInputError),
                       ("<lora:x:1:0.5>", UnsupportedModelError), ("<hypernet:h:1>", UnsupportedModelError)]:  # fmt: skip
        with pytest.raises(error):
            split_extra_networks(bad)


def test_a_tag_equals_the_same_lora_given_with_the_flag(run, lora_file, lora_dir):  # noqa: F811
    run("a fox", "--lora", f"{lora_file[0]}:0.8", "-o", "flag.png")
    result = run("a fox <lora:detail_tweak:0.8>", "--lora-dir", str(lora_dir), "-o", "tag.png")
    assert "lora detail_tweak.safetensors: applied" in result.stderr
    run("a fox", "-o", "plain.png")
    assert pixels("tag.png") == pixels("flag.png") != pixels("plain.png")
    meta = json.loads(Image.open("tag.png").text["sdcli"])
    assert meta["prompt"] == "a fox <lora:detail_tweak:0.8>"  # as A1111 records it: replays re-apply the tag
    assert [(e["name"], e["weight"]) for e in meta["loras"]] == [("detail_tweak.safetensors", 0.8)]
    assert "lora_dir" not in meta["config"]  # a folder of the user's, not recorded
    assert 'Lora hashes: "detail_tweak: ' in Image.open("tag.png").text["parameters"]


def test_prompts_file_jobs_switch_lora_sets(run, lora_dir, tmp_path):
    run("a fox", "-o", "plain.png")
    run("a fox <lora:detail_tweak:0.8>", "--lora-dir", str(lora_dir), "-o", "alone.png")
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"prompt": "a fox", "output": "j1.png"}, {"prompt": "a fox <lora:detail_tweak:0.8>", "output": "j2.png"},
             {"prompt": "a fox", "output": "j3.png"}, {"prompt": "a fox <lora:detail_tweak:0.8>", "output": "j4.png"}]
    jobs.write_text("".join(json.dumps({**line, "seed": 9}) + "\n" for line in lines))
    result = run("--prompts-file", str(jobs), "--lora-dir", str(lora_dir))
    assert result.stderr.count("lora detail_tweak.safetensors: applied") == 2  # merged for job 2 and again for 4
    assert pixels("j1.png") == pixels("j3.png") == pixels("plain.png")  # the weights went back exactly
    assert pixels("j2.png") == pixels("j4.png") == pixels("alone.png")


@pytest.mark.parametrize(("prompt", "flags", "code", "message"), [
    ("a <lora:detail_tweak>", [], 4, "set --lora-dir"),
    ("a <lora:nothing_here:0.5>", ["--lora-dir", "LORAS"], 4, "no nothing_here.safetensors under"),
    ("a <lora:detail_tweak:1:0.5>", ["--lora-dir", "LORAS"], 8, "separate text-encoder/UNet weights"),
    ("a <hypernet:detail_tweak:1>", ["--lora-dir", "LORAS"], 8, "not A1111 'hypernet' networks"),
    ("a <lora:detail_tweak:strong>", ["--lora-dir", "LORAS"], 3, "the weight must be a finite number"),
])  # fmt: skip
def test_bad_tags_fail_before_loading_and_write_nothing(run, lora_dir, prompt, flags, code, message):
    flags = [str(lora_dir) if f == "LORAS" else f for f in flags]
    result = run(prompt, *flags, "-o", "x.png", expect=code)
    assert message in result.stderr and "loading" not in result.stderr
    assert not Path("x.png").exists()


def test_verify_resolves_the_tag_again(run, tiny_sd1, lora_dir):  # noqa: F811
    run("a fox <lora:detail_tweak:0.8>", "--lora-dir", str(lora_dir), "-o", "v.png")
    ok = run("v.png", "-m", str(tiny_sd1), "--lora-dir", str(lora_dir), "--json", command="verify")
    assert json.loads(ok.stdout)["identical"]
    run("v.png", "-m", str(tiny_sd1), expect=4, command="verify")  # the tag names a LoRA it cannot find


def test_dry_run_lists_the_tags_and_tokenizes_the_text_without_them(run):
    result = run("a fox <lora:detail_tweak:0.8>", "--dry-run", "--json")
    plan = json.loads(result.stdout.splitlines()[0])
    assert plan["prompt_loras"] == [{"name": "detail_tweak", "weight": 0.8}]
    assert "lora" not in json.dumps(plan["tokens"])


def test_inspect_prompt_shows_the_tags_apart_from_the_tokens(run):
    result = run("--prompt", "a car <lora:detail_tweak:0.7>", "--json", command="inspect")
    report = json.loads(result.stdout)
    assert report["loras"] == [{"name": "detail_tweak", "weight": 0.7}]
    assert report["n_tokens"] == 2  # "a car": the tag is not words

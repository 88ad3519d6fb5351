"""Infotext write/read, and reading other tools' metadata from PNGs built here per their formats."""

import json
import subprocess
import sys

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sd_parsers import ParserManager
from sdcli.runtime.errors import BadInputError
from sdcli.output.metadata import (SDCLI_JSON_KEY, canonical_sampler, format_infotext, parse_infotext,
                            read_image_metadata)
from sdcli.output.targets import save_png

PARAMS = dict(prompt="a photo of a cat, (sitting:1.2) on a mat", negative_prompt="blurry, low quality",
              steps=20, sampler="dpm++_2m", schedule="karras", cfg_scale=7.5, seed=1234, width=64, height=48,
              model_hash="abcdef1234", model="tiny-sd15")


def _png(path, chunks: dict, itxt=()):
    info = PngInfo()
    for k, v in chunks.items():
        (info.add_itxt if k in itxt else info.add_text)(k, v)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, pnginfo=info)
    return path


def test_infotext_layout():
    text = format_infotext(PARAMS)
    lines = text.split("\n")
    assert lines[0] == PARAMS["prompt"]
    assert lines[1] == "Negative prompt: blurry, low quality"
    assert lines[2].startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, "
                               "Size: 64x48, Model hash: abcdef1234, Model: tiny-sd15, RNG: CPU, Version: sdcli ")


def test_round_trip():
    back = parse_infotext(format_infotext(PARAMS))
    for key, value in PARAMS.items():
        assert back[key] == value, key


def test_size_given_as_text():
    p = {k: v for k, v in PARAMS.items() if k not in ("width", "height")}
    back = parse_infotext(format_infotext(dict(p, size="640x384")))
    assert (back["width"], back["height"]) == (640, 384)


def test_values_sanitised():
    p = dict(PARAMS, model="my,model:v2\nfinal", sampler="Weird, name: x")
    last = format_infotext(p).split("\n")[-1]
    pairs = [item.split(":") for item in last.split(",")]
    assert all(len(pair) == 2 for pair in pairs), last  # every ", "-item is exactly one "Key: value"
    back = parse_infotext(format_infotext(p))
    assert back["model"] == "my model v2 final"
    assert back["seed"] == 1234 and back["steps"] == 20


def test_sd_parsers_reads_our_png(tmp_path):
    meta = {"prompt": PARAMS["prompt"], "seed": 1234}
    path = save_png(Image.new("RGB", (64, 48)), tmp_path / "x.png", format_infotext(PARAMS), meta)
    info = ParserManager().parse(path)
    assert info is not None
    sampler = info.samplers[0]
    assert sampler.name == "DPM++ 2M"
    assert sampler.parameters["steps"] == "20"
    assert sampler.parameters["cfg_scale"] == "7.5"
    assert sampler.parameters["seed"] == "1234"
    assert sampler.parameters["scheduler"] == "Karras"
    assert sampler.model.name == "tiny-sd15" and sampler.model.hash == "abcdef1234"
    assert [p.value for p in info.prompts] == [PARAMS["prompt"]]
    assert [p.value for p in info.negative_prompts] == [PARAMS["negative_prompt"]]


def test_non_latin1_prompt_goes_to_itxt_and_reads_back(tmp_path):
    p = dict(PARAMS, prompt="猫の写真 🐱, 可愛い", negative_prompt="ぼやけた")
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "u.png", format_infotext(p), {"prompt": p["prompt"]})
    raw = path.read_bytes()
    assert b"iTXtparameters" in raw and b"tEXtparameters" not in raw
    got = read_image_metadata(path)
    assert got["source"] == "sdcli"
    assert got["parameters"]["prompt"] == p["prompt"]
    assert got["parameters"]["negative_prompt"] == "ぼやけた"
    assert got["sdcli"] == {"prompt": p["prompt"]}
    info = ParserManager().parse(path)
    assert [x.value for x in info.prompts] == [p["prompt"]]


def test_latin1_prompt_is_plain_text_chunk(tmp_path):
    path = save_png(Image.new("RGB", (8, 8)), tmp_path / "l.png", format_infotext(PARAMS), {})
    assert b"tEXtparameters" in path.read_bytes()


def test_read_a1111_png(tmp_path):
    text = ("masterpiece, 1girl\nNegative prompt: (worst quality:1.4)\nSteps: 28, Sampler: DPM++ 2M Karras, "
            "CFG scale: 6.5, Seed: 2179987202, Size: 768x512, Model hash: 93b79e09ed, Model: anything-v4.5, "
            'Lora hashes: "detail: 1a2b3c, style: 4d5e6f", Clip skip: 2, Version: v1.6.0')
    got = read_image_metadata(_png(tmp_path / "a.png", {"parameters": text}))
    assert got["source"] == "a1111"
    p = got["parameters"]
    assert (p["prompt"], p["negative_prompt"]) == ("masterpiece, 1girl", "(worst quality:1.4)")
    assert (p["steps"], p["sampler"], p["schedule"], p["cfg_scale"]) == (28, "dpm++_2m", "karras", 6.5)
    assert (p["seed"], p["width"], p["height"], p["clip_skip"]) == (2179987202, 768, 512, 2)
    assert p["extra"]["Lora hashes"] == "detail: 1a2b3c, style: 4d5e6f"


def test_read_sdcpp_png(tmp_path):
    # Layout of stable-diffusion.cpp examples/common get_image_params().
    text = ("a lovely cat\nNegative prompt: ugly\nSteps: 20, CFG scale: 7.000000, Guidance: 3.500000, "
            "Eta: 0.000000, Seed: 42, Size: 512x512, Model: v1-5-pruned-emaonly.safetensors, RNG: cuda, "
            "Sampler: euler_a karras, Version: stable-diffusion.cpp")
    got = read_image_metadata(_png(tmp_path / "s.png", {"parameters": text}))
    assert got["source"] == "sd.cpp"
    p = got["parameters"]
    assert (p["prompt"], p["negative_prompt"], p["steps"], p["cfg_scale"], p["seed"]) == (
        "a lovely cat", "ugly", 20, 7.0, 42)
    assert (p["sampler"], p["schedule"], p["model"]) == ("euler_a", "karras", "v1-5-pruned-emaonly.safetensors")


COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 156680208700286, "steps": 20, "cfg": 8.0,
          "sampler_name": "dpmpp_2m", "scheduler": "karras", "denoise": 1.0, "model": ["10", 0],
          "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "10": {"class_type": "LoraLoader", "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "x.safetensors"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 768, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery, glass bottle", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
}


def test_read_comfyui_png(tmp_path):
    workflow = {"nodes": [{"id": 3, "type": "KSampler", "widgets_values": [1, "fixed", 20, 8, "euler", "normal", 1]}]}
    path = _png(tmp_path / "c.png", {"prompt": json.dumps(COMFY_PROMPT), "workflow": json.dumps(workflow)})
    got = read_image_metadata(path)
    assert got["source"] == "comfyui"
    p = got["parameters"]
    assert (p["seed"], p["steps"], p["cfg_scale"], p["sampler"], p["schedule"]) == (
        156680208700286, 20, 8.0, "dpm++_2m", "karras")
    assert (p["prompt"], p["negative_prompt"]) == ("beautiful scenery, glass bottle", "text, watermark")
    assert (p["model"], p["width"], p["height"]) == ("v1-5-pruned-emaonly.safetensors", 512, 768)


def test_read_comfyui_workflow_only(tmp_path):
    workflow = {"nodes": [{"id": 3, "type": "KSampler", "widgets_values": [77, "fixed", 12, 5.5, "euler_ancestral",
                                                                          "normal", 1]},
                          {"id": 6, "type": "CLIPTextEncode", "widgets_values": ["a cat"]}]}
    got = read_image_metadata(_png(tmp_path / "w.png", {"workflow": json.dumps(workflow)}))
    assert got["source"] == "comfyui"
    p = got["parameters"]
    assert (p["seed"], p["steps"], p["cfg_scale"], p["sampler"], p["texts"]) == (77, 12, 5.5, "euler_a", ["a cat"])


def test_sdcli_json_chunk_recognised(tmp_path):
    meta = {"config": {"steps": 3}, "model_sha256": "00" * 32}
    path = _png(tmp_path / "j.png", {"parameters": format_infotext(PARAMS), SDCLI_JSON_KEY: json.dumps(meta)},
                itxt=(SDCLI_JSON_KEY,))
    got = read_image_metadata(path)
    assert got["source"] == "sdcli" and got["sdcli"] == meta and got["parameters"]["seed"] == 1234


def test_jpeg_exif_usercomment(tmp_path):
    text = "a dog\nSteps: 10, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + text.encode("utf-16-be")
    path = tmp_path / "a.jpg"
    Image.new("RGB", (64, 64)).save(path, exif=exif)
    got = read_image_metadata(path)
    assert got["source"] == "a1111"
    assert (got["parameters"]["prompt"], got["parameters"]["sampler"], got["parameters"]["seed"]) == ("a dog", "euler_a", 5)


def test_plain_png_has_no_source(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_image_metadata(path)["source"] is None


@pytest.mark.parametrize("kind", ["missing", "dir", "garbage"])
def test_read_metadata_bad_files(tmp_path, kind):
    path = tmp_path / "x.png"
    if kind == "dir":
        path.mkdir()
    elif kind == "garbage":
        path.write_bytes(b"not an image at all")
    with pytest.raises(BadInputError, match="x.png"):
        read_image_metadata(path)


def test_prompt_only_text_is_not_params():
    assert parse_infotext("just a prompt, with: a colon") == {"prompt": "just a prompt, with: a colon",
                                                               "negative_prompt": ""}


def test_sampler_aliases():
    assert canonical_sampler("Euler a") == "euler_a"
    assert canonical_sampler("dpmpp_2m_sde") == "dpm++_2m_sde"
    assert canonical_sampler("DPM++ 2S a") == "dpm++_2s_a"
    assert canonical_sampler("mystery") == "mystery"


def test_metadata_module_does_not_import_torch():
    code = "import sys, sdcli.output.metadata, sdcli.output.targets; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_trailing_schedule_written_in_a1111_style_and_read_back():
    # Turbo's schedule: A1111 has no such "Schedule type"; written in its style, read back as ours
    text = format_infotext(dict(PARAMS, sampler="euler_a", schedule="trailing", cfg_scale=0.0))
    assert "Sampler: Euler a, Schedule type: Trailing, CFG scale: 0, " in text
    back = parse_infotext(text)
    assert (back["sampler"], back["schedule"], back["cfg_scale"]) == ("euler_a", "trailing", 0.0)
    assert parse_infotext(text.replace("Sampler: Euler a, Schedule type: Trailing", "Sampler: Euler a Trailing")
                          )["schedule"] == "trailing"  # old A1111 style: the schedule inside the sampler label

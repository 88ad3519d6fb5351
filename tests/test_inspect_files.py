"""`sdcli inspect` on every kind of file sdcli reads, each made by scripts/make_checkpoint.py's own command line
(its `main(argv)`): the report says the kind, family, sizes, trigger words and hashes, and each made file is also
one that sdcli's loaders accept (a LoRA that applies to all its modules, a TAESD and a VAE that load strictly, an
embedding that reads back). Several paths in one call, an unreadable one among them; `inspect --list`.

Expected values come from the makers' own settings (the tiny presets' widths, the --rank/--vectors/--tags given)
and from hashes computed here with hashlib, never from sdcli's output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import make_checkpoint
import pytest
from _fixtures_models import tiny_models_dir, tiny_sd1  # noqa: F401
from make_checkpoint import PRESETS, SDXL_PRESETS, TINY_CLIP_L, main, tiny_t5
from make_extras import lora_targets
from safetensors.torch import save_file
from typer.testing import CliRunner

from sdcli.cli import app

RANK, VECTORS = 3, 5
TAGS = "mychar:30,red hair:12,smile:4"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """One file of each kind, through make_checkpoint.py's command line."""
    root = tmp_path_factory.mktemp("made")
    runs = {
        "xl": ["xl.safetensors", "--family", "sdxl"],
        "flux": ["flux/flux1-dev.safetensors", "--family", "flux"],
        "lora": ["loras/mychar.safetensors", "--kind", "lora", "--rank", str(RANK), "--tags", TAGS],
        "xl_lora": ["loras/xl/style.safetensors", "--kind", "lora", "--family", "sdxl", "--no-metadata"],
        "emb_pt": ["embeddings/myemb.pt", "--kind", "embedding", "--vectors", str(VECTORS)],
        "emb_st": ["embeddings/other.safetensors", "--kind", "embedding", "--layout", "emb_params"],
        "emb_xl": ["embeddings/xl.safetensors", "--kind", "embedding", "--family", "sdxl"],
        "taesd": ["vae/taesd", "--kind", "taesd"],
        "vae": ["vae/ae.safetensors", "--kind", "vae", "--family", "flux"],
        "upscaler": ["upscalers/2x-tiny.pth", "--kind", "upscaler", "--arch", "compact", "--scale", "2"],
        "controlnet": ["cn/control_tiny.safetensors", "--kind", "controlnet"],
        "controlnet_pth": ["cn/control_tiny.pth", "--kind", "controlnet", "--layout", "pth"],
        "clip_l": ["text/clip_l.safetensors", "--kind", "clip-l"],
        "t5": ["text/t5xxl.safetensors", "--kind", "t5"],
    }
    out = {}
    for name, (target, *args) in runs.items():
        main([str(root / target), *args])
        out[name] = root / target
    out["taesd_decoder"] = out["taesd"] / "taesd_decoder.safetensors"
    return out


def _inspect(*args: str, expect: int = 0):
    result = CliRunner().invoke(app, ["inspect", *map(str, args)])
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    return result


def _report(path: Path, *flags: str) -> dict:
    return json.loads(_inspect(path, "--json", *flags).stdout)


def _body_sha256(path: Path) -> str:
    """kohya's addnet hash, written out here: the sha256 of what follows the 8-byte length and the JSON header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_lora_report_and_the_lora_applies_to_every_module(made, tiny_sd1):  # noqa: F811
    from sdcli.loading.checkpoint import load_models
    from sdcli.loading.lora import LoraSpec, apply_lora

    report = _report(made["lora"])
    targets = lora_targets("sd1", "tiny")
    text = [k for k in targets if k.startswith("lora_te_")]
    assert (report["kind"], report["format"], report["rank"]) == ("lora", "kohya", RANK)
    assert (report["modules"], report["text_encoder_modules"]) == (len(targets), len(text))
    # a tiny model's context width is no release's: the family comes from kohya's metadata
    assert (report["family"], report["family_from"]) == ("sd1", "metadata")
    assert report["tags"] == {"mychar": 30, "red hair": 12, "smile": 4}  # most frequent first
    assert list(report["tags"]) == ["mychar", "red hair", "smile"]
    assert report["training"]["network dim"] == str(RANK) and report["alpha"] == str(RANK / 2)
    body = _body_sha256(made["lora"])
    assert report["autov3"] == body and report["a1111_hash"] == body[:12]
    assert report["sha256"] == hashlib.sha256(made["lora"].read_bytes()).hexdigest()
    applied = apply_lora(load_models(tiny_sd1), LoraSpec(made["lora"], 1.0))
    assert applied.applied == applied.total == len(targets)


def test_sdxl_lora_without_metadata_is_placed_by_its_two_text_encoders(made):
    report = _report(made["xl_lora"], "--no-hash")
    assert (report["family"], report["family_from"]) == ("sdxl", "shapes")
    assert "tags" not in report and "sha256" not in report
    assert report["modules"] == len(lora_targets("sdxl", "tiny"))


def test_embeddings_report_vectors_widths_and_family(made):
    from sdcli.text.embeddings import read_embedding

    width = PRESETS[("sd1", "tiny")][2].hidden_size
    pt = _report(made["emb_pt"])
    assert (pt["kind"], pt["trigger"], pt["vectors"], pt["widths"]) == ("textual_inversion", "myemb", VECTORS,
                                                                        {"*": width})  # fmt: skip
    assert pt["family"] is None and str(width) in pt["note"]  # 64 wide: no release's width
    assert pt["training"]["step"] == "500" and pt["a1111_hash"] == hashlib.sha256(made["emb_pt"].read_bytes()
                                                                                  ).hexdigest()[:12]  # fmt: skip
    assert read_embedding(made["emb_pt"]).vectors["*"].shape == (VECTORS, width)
    st = _report(made["emb_st"])
    assert (st["format"], st["vectors"], st["widths"]) == ("kohya (emb_params)", 2, {"*": width})
    _, _, text_l, text_g = SDXL_PRESETS[("sdxl", "tiny")]
    xl = _report(made["emb_xl"])
    assert (xl["family"], xl["widths"]) == ("sdxl", {"clip_l": text_l.hidden_size, "clip_g": text_g.hidden_size})


def test_taesd_and_vae_files_report_and_load(made):
    from sdcli.loading.vae import load_vae
    from sdcli.models.taesd import load_taesd

    tae = _report(made["taesd_decoder"])
    assert (tae["kind"], tae["parts"], tae["latent_channels"], tae["width"]) == ("taesd", ["decoder"], 4, 16)
    assert tae["named"] == "taesd" and set(tae["families"]) == {"sd1", "sd2"}
    assert load_taesd(made["taesd_decoder"], made["taesd"] / "taesd_encoder.safetensors").encoder is not None
    vae = _report(made["vae"])
    assert (vae["kind"], vae["latent_channels"], vae["quant_conv"]) == ("vae", 16, False)
    assert {"sd3", "flux"} <= set(vae["families"]) and "sd1" not in vae["families"]
    assert load_vae(made["vae"]).config.z_channels == 16


def test_text_encoders_upscaler_controlnet_and_checkpoints(made):
    clip = _report(made["clip_l"], "--no-hash")
    assert (clip["kind"], clip["encoder"], clip["width"], clip["layers"]) == (
        "text_encoder", "CLIP", TINY_CLIP_L.hidden_size, TINY_CLIP_L.num_layers)
    t5 = _report(made["t5"], "--no-hash")
    assert (t5["encoder"], t5["width"], t5["layers"]) == ("T5", tiny_t5().d_model, tiny_t5().num_layers)
    assert _report(made["upscaler"], "--no-hash")["scale"] == 2
    assert _report(made["controlnet"], "--no-hash")["kind"] == "controlnet"
    assert _report(made["controlnet_pth"], "--no-hash")["kind"] == "controlnet"  # a pickle, not an embedding
    assert _report(made["xl"], "--no-hash")["family"] == "sdxl"
    assert _report(made["flux"], "--no-hash")["family"] == "flux"


def test_several_paths_one_json_line_each_and_the_worst_exit_code(made, tmp_path):
    unknown = tmp_path / "odd.safetensors"  # a UNet of no known layout: exit 8
    save_file({"model.diffusion_model.odd_block.weight": __import__("torch").zeros(2)}, str(unknown))
    paths = [made["lora"], tmp_path / "missing.safetensors", made["emb_pt"], unknown, made["vae"]]
    result = _inspect(*paths, "--json", "--no-hash", expect=8)
    kinds = [json.loads(line)["kind"] for line in result.stdout.splitlines()]
    assert kinds == ["lora", "textual_inversion", "vae"]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and "missing.safetensors" in errors[0] and "odd.safetensors" in errors[1]
    text = _inspect(made["lora"], made["vae"], "--no-hash").stdout
    assert text.count("kind: ") == 2 and "\n\nkind: vae" in text  # two blocks, a blank line between


def test_list_the_configured_folders_and_given_ones(made, tmp_path, monkeypatch):
    root = made["lora"].parents[1]
    config = tmp_path / "xdg" / "sdcli" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(f"lora_dir: {root / 'loras'}\nembeddings_dir: {root / 'embeddings'}\n"
                      f"vae_dir: {root / 'vae'}\nupscaler_dir: {root / 'upscalers'}\nmodel: {made['xl']}\n")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    lines = [json.loads(line) for line in _inspect("--list", "--json").stdout.splitlines()]
    found = {(e["kind"], e["name"]) for e in lines}
    assert {("lora", "mychar"), ("lora", "xl/style"), ("textual_inversion", "myemb"), ("vae", "ae"),
            ("taesd", "taesd/taesd_decoder"), ("upscaler", "2x-tiny"), ("checkpoint", "xl")} <= found
    assert ("text_encoder", "clip_l") not in found  # text/ is no configured folder
    loras = _inspect("--list", "--kind", "loras").stdout.splitlines()
    assert len(loras) == 2 and all(line.startswith("lora ") for line in loras) and "sd1" in loras[0]
    given = [json.loads(line) for line in _inspect("--list", root / "text", "--json").stdout.splitlines()]
    assert [(e["kind"], e["name"]) for e in given] == [("text_encoder", "clip_l"), ("text_encoder", "t5xxl")]
    bad = _inspect("--list", "--kind", "pictures", expect=2)
    assert "pictures" in bad.stderr


def test_list_without_folders_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    assert "no folders to list" in _inspect("--list", expect=2).stderr


def test_make_checkpoint_help_describes_every_option_and_refuses_bad_combinations(capsys):
    parser = make_checkpoint._parser()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    text = parser.format_help()
    assert all(kind in text for kind in make_checkpoint.KINDS)
    with pytest.raises(SystemExit) as exit_:
        main(["x.safetensors", "--kind", "lora", "--family", "flux"])
    assert exit_.value.code == 2 and "UNet families" in capsys.readouterr().err


def test_inspecting_images_never_imports_torch(tmp_path):
    """Several images in one call stay a fast command: torch is never imported (a fresh process says)."""
    import subprocess
    import sys

    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    probe = ("import sys; from sdcli.cli import app; from typer.testing import CliRunner; "
             "r = CliRunner().invoke(app, ['inspect', 'a.png', 'b.png', '--json']); "
             "print(r.exit_code, len(r.stdout.splitlines()), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.stdout.split() == ["0", "2", "False"], out.stderr


@pytest.mark.parametrize(("keys", "fmt", "family"), [
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight": (4, 2048),
      "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight": (640, 4)},
     "diffusers (PEFT)", "sdxl"),  # SDXL's 2048-wide context
    ({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (8, 3072),
      "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (9216, 8)}, "kohya", "flux"),
    ({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": (320, 4),
      "lora_unet_mid_block_attentions_0_proj_in.hada_w1_b": (4, 320)}, "LyCORIS LoHa", None),
])  # fmt: skip
def test_other_lora_formats_and_families_from_the_header(tmp_path, keys, fmt, family):
    import torch

    path = tmp_path / "l.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, str(path))
    report = _report(path, "--no-hash")
    assert (report["kind"], report["format"], report["family"]) == ("lora", fmt, family)

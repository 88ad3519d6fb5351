"""LoRA (kohya / A1111 format) on the tiny SD1 model: the merged UNet and text encoder match diffusers' UNet and
transformers' CLIPTextModel (the diffusers-folder twin) with the same LoRA merged by module name in this test;
weight 0 is a no-op; files that match nothing, partly match, or are not safetensors give clear errors; the CLI
records name, hash and weight in the PNG metadata and A1111's "Lora hashes" field.
peft is not installed, so diffusers' load_lora_weights cannot be the oracle: the test merges W + s*up@down into
the oracle models itself, by the diffusers module path that kohya's key spells out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from _fixtures_models import tiny_models_dir, tiny_sd1, tiny_sd1_diffusers  # noqa: F401
from _fixtures_pipeline import one_thread  # noqa: F401
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from sd_parsers import ParserManager
from transformers import CLIPTextModel
from typer.testing import CliRunner

from sdcli.loading.checkpoint import load_models
from sdcli.formats.hashing import a1111_lora_hash, file_sha256
from sdcli.cli import app
from sdcli.runtime.errors import BadInputError
from sdcli.loading.lora import LoraSpec, apply_lora, parse_spec

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL = 1e-5
RANK = 4

# (module path in the diffusers / transformers tree, kohya key, alpha or None). One LDM-spelled UNet key:
# input_blocks.2.1 is down_blocks.0.attentions.1 (LDM input block 1 + j of level 0 holds attention j).
UNET_MODULES = [
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", None, 2.0),
    ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", None, None),
    ("down_blocks.0.attentions.0.proj_in", None, 4.0),  # 1x1 conv in SD1
    ("mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", None, 1.0),
    ("up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj", None, 8.0),
    ("up_blocks.1.attentions.1.proj_out", None, 3.0),
    ("down_blocks.0.resnets.0.conv1", None, 2.0),  # 3x3 conv (LoCon)
    ("down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
     "lora_unet_input_blocks_2_1_transformer_blocks_0_attn2_to_v", 2.0),
]  # fmt: skip
TEXT_MODULES = [("text_model.encoder.layers.0.self_attn.q_proj", 2.0), ("text_model.encoder.layers.1.mlp.fc1", None)]


def _pair(weight: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for a Linear (out, in) or a conv (out, in, k, k): down keeps the kernel, up is 1x1."""
    down = torch.randn(RANK, *weight.shape[1:], generator=g) * 0.3
    up = torch.randn(weight.shape[0], RANK, *([1, 1] if weight.dim() == 4 else []), generator=g) * 0.3
    return down, up


def _delta(down: torch.Tensor, up: torch.Tensor, alpha: float | None) -> torch.Tensor:
    scale = (alpha if alpha is not None else RANK) / RANK
    if down.dim() == 4:  # a 1x1 up conv after a k x k down conv is one k x k conv
        return scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    return scale * up @ down


@pytest.fixture(scope="module")
def oracle(tiny_sd1_diffusers):  # noqa: F811
    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_diffusers / "unet").eval()
    text = CLIPTextModel.from_pretrained(tiny_sd1_diffusers / "text_encoder").eval()
    return unet, text


@pytest.fixture(scope="module")
def lora_file(oracle, tmp_path_factory) -> tuple[Path, dict]:
    """A kohya LoRA for the tiny model and {(tree, module path): delta at weight 1}."""
    unet, text = oracle
    g = torch.Generator().manual_seed(5)
    tensors, deltas = {}, {}
    targets = [("unet", p, k or "lora_unet_" + p.replace(".", "_"), a) for p, k, a in UNET_MODULES]
    targets += [("text", p, "lora_te_" + p.replace(".", "_"), a) for p, a in TEXT_MODULES]
    for tree, path, key, alpha in targets:
        weight = _sub(unet if tree == "unet" else text, path).weight
        down, up = _pair(weight, g)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down, up
        if alpha is not None:
            tensors[f"{key}.alpha"] = torch.tensor(alpha)
        deltas[(tree, path)] = _delta(down, up, alpha).reshape(weight.shape)
    out = tmp_path_factory.mktemp("lora") / "detail_tweak.safetensors"
    save_file(tensors, str(out))
    return out, deltas


def _sub(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """kohya keeps the `text_model.` level in its names; transformers >= 5.6 no longer nests it."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(path.removeprefix("text_model."))


def _merged_oracle(oracle, deltas: dict, weight: float):
    unet, text = oracle
    unet, text = UNet2DConditionModel.from_config(unet.config).eval(), _copy_text(text)
    unet.load_state_dict(oracle[0].state_dict())
    with torch.no_grad():
        for (tree, path), delta in deltas.items():
            module = _sub(unet if tree == "unet" else text, path)
            module.weight.add_(weight * delta)
    return unet, text


def _copy_text(text: CLIPTextModel) -> CLIPTextModel:
    copy = CLIPTextModel(text.config).eval()
    copy.load_state_dict(text.state_dict())
    return copy


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    return x, torch.tensor([999.0, 17.25]), ctx, ids


@torch.no_grad()
def _outputs(models):
    x, t, ctx, ids = _inputs()
    return models.unet(x, t, ctx), models.text_encoder(ids)


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert scale > 1e-3 and err <= RTOL * scale, f"max abs diff {err:.3g} vs scale {scale:.3g}"


def test_merged_lora_matches_diffusers_oracle(tiny_sd1, oracle, lora_file):  # noqa: F811
    path, deltas = lora_file
    models = load_models(tiny_sd1)
    before = _outputs(models)
    report = apply_lora(models, LoraSpec(path, 0.7))
    assert (report.applied, report.total) == (len(deltas), len(deltas))
    assert report.sha256 == file_sha256(path) and report.name == "detail_tweak"
    unet, text = _merged_oracle(oracle, deltas, 0.7)
    x, t, ctx, ids = _inputs()
    with torch.no_grad():
        ref_unet, ref_text = unet(x, t, encoder_hidden_states=ctx).sample, text(input_ids=ids).last_hidden_state
    ours_unet, ours_text = _outputs(models)
    _close(ours_unet, ref_unet)
    _close(ours_text, ref_text)
    # the LoRA really changed both networks (by far more than the tolerance above)
    assert (ours_unet - before[0]).abs().max() > 1e-2 * ref_unet.abs().max()
    assert (ours_text - before[1]).abs().max() > 1e-2 * ref_text.abs().max()


def test_weight_zero_is_bit_identical(tiny_sd1, lora_file):  # noqa: F811
    models = load_models(tiny_sd1)
    before = _outputs(models)
    report = apply_lora(models, parse_spec(f"{lora_file[0]}:0"))
    assert report.weight == 0.0 and report.applied == len(lora_file[1])
    after = _outputs(models)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_parse_spec(lora_file, tmp_path):
    path = lora_file[0]
    assert parse_spec(str(path)) == LoraSpec(path, 1.0)
    assert parse_spec(f"{path}:-0.25") == LoraSpec(path, -0.25)


def _write(path: Path, keys: list[str]) -> Path:
    g = torch.Generator().manual_seed(3)
    tensors = {}
    for key in keys:
        tensors[f"{key}.lora_down.weight"] = torch.randn(RANK, 64, generator=g)
        tensors[f"{key}.lora_up.weight"] = torch.randn(64, RANK, generator=g)
    save_file(tensors, str(path))
    return path


SDXL_KEYS = ["lora_unet_input_blocks_7_1_transformer_blocks_9_attn1_to_q", "lora_te2_text_model_encoder_layers_0_mlp_fc1"]


@pytest.fixture
def cli(tiny_sd1, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    base = ["generate", "-m", str(tiny_sd1), "--device", "cpu", "--dtype", "fp32", "--steps", "2", "-W", "64",
            "-H", "64", "--sampler", "euler", "--seed", "9"]  # fmt: skip

    def run(*args: str, expect: int = 0):
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


def test_lora_matching_nothing_is_exit_3(cli, tiny_sd1, tmp_path):  # noqa: F811
    bad = _write(tmp_path / "xl.safetensors", SDXL_KEYS)
    result = cli("a fox", "--lora", str(bad), "-o", "x.png", expect=3)
    assert "xl.safetensors" in result.stderr and "no key of this LoRA matches the model" in result.stderr
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(BadInputError, match="is it for another family"):
        apply_lora(load_models(tiny_sd1), parse_spec(str(bad)))


def test_partly_matching_lora_reports_count(cli, tmp_path):
    mixed = _write(tmp_path / "mixed.safetensors", [*SDXL_KEYS, "lora_te_text_model_encoder_layers_0_self_attn_k_proj"])
    result = cli("a fox", "--lora", f"{mixed}:0.5", "-o", "m.png")
    assert "lora mixed.safetensors: applied 1 of 3 modules (weight 0.5); 2 match no module" in result.stderr


def test_lora_not_safetensors(cli, tmp_path):
    page = tmp_path / "page.safetensors"
    page.write_text("<html>rate limited</html>")
    result = cli("a fox", "--lora", str(page), "-o", "p.png", expect=3)
    assert "page.safetensors" in result.stderr and "HTML" in result.stderr


def test_cli_records_lora_in_metadata(cli, lora_file, tmp_path):
    path, deltas = lora_file
    plain = cli("a fox", "-o", "plain.png")
    result = cli("a fox", "--lora", f"{path}:0.8", "-o", "l.png", "--json")
    assert f"lora detail_tweak.safetensors: applied {len(deltas)} of {len(deltas)} modules (weight 0.8)" \
        in result.stderr and plain.exit_code == 0
    sha = file_sha256(path)
    report = json.loads(CliRunner().invoke(app, ["inspect", "l.png", "--json"]).stdout)
    assert report["sdcli"]["loras"] == [{"name": "detail_tweak.safetensors", "sha256": sha, "weight": 0.8,
                                         "applied": len(deltas), "modules": len(deltas)}]
    raw = path.read_bytes()  # A1111 writes kohya's addnet hash: the sha256 of the bytes after the header
    addnet = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    assert addnet != sha and report["parameters"]["extra"]["Lora hashes"] == f"detail_tweak: {addnet[:12]}"
    info = ParserManager().parse(tmp_path / "l.png")
    assert [p.value for p in info.prompts] == ["a fox"]
    assert info.samplers[0].parameters["seed"] == "9"
    from PIL import Image

    assert Image.open("l.png").tobytes() != Image.open("plain.png").tobytes()  # the LoRA changed the render


def test_verify_needs_and_reapplies_the_loras(cli, tiny_sd1, lora_file, tmp_path):  # noqa: F811
    path, _ = lora_file
    cli("a fox", "--lora", f"{path}:0.8", "-o", "v.png")
    verify = ["verify", "v.png", "-m", str(tiny_sd1), "--json"]
    missing = CliRunner().invoke(app, verify)
    assert missing.exit_code == 2 and "made with LoRA detail_tweak.safetensors" in missing.stderr
    again = CliRunner().invoke(app, [*verify, "--lora", f"{path}:0.8"])
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["identical"]


def test_img2img_applies_and_records_loras(cli, tiny_sd1, lora_file, tmp_path):  # noqa: F811
    path, deltas = lora_file
    cli("a fox", "-o", "src.png")
    base = ["img2img", "a fox", "-i", "src.png", "-m", str(tiny_sd1), "--steps", "2", "--seed", "3"]
    plain = CliRunner().invoke(app, [*base, "-o", "p.png"])
    with_lora = CliRunner().invoke(app, [*base, "--lora", f"{path}:0.8", "-o", "q.png"])
    assert plain.exit_code == 0 and with_lora.exit_code == 0, with_lora.stderr
    assert f"applied {len(deltas)} of {len(deltas)} modules" in with_lora.stderr
    from PIL import Image

    meta = json.loads(Image.open(tmp_path / "q.png").text["sdcli"])
    assert [entry["name"] for entry in meta["loras"]] == ["detail_tweak.safetensors"]
    assert Image.open(tmp_path / "q.png").tobytes() != Image.open(tmp_path / "p.png").tobytes()


def test_lora_hash_is_a1111s(tmp_path):
    """A1111's "Lora hashes": the file's sshs_model_hash metadata if present, else the sha256 of the bytes after the
    safetensors header (so rewriting the metadata keeps it), else (a pickle) the whole file's sha256."""
    weights = {"lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha": torch.tensor(1.0)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(weights, str(a))
    save_file(weights, str(b), metadata={"ss_output_name": "b"})
    assert a.read_bytes() != b.read_bytes()
    assert a1111_lora_hash(a) == a1111_lora_hash(b) != file_sha256(a)
    given = "ab" * 32
    save_file(weights, str(b), metadata={"sshs_model_hash": given})
    assert a1111_lora_hash(b) == given
    pt = tmp_path / "c.pt"
    torch.save(weights, pt)
    assert a1111_lora_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()

"""Diffusers folders and hub ids of SD3.5 and FLUX.1 (sdcli/formats/dit_folders.py): the tiny random pipelines of
tests/_fixtures_dit.py saved with diffusers' own save_pretrained, then

- loaded by sdcli: every weight equal, bit for bit, to the same model's single file (Stability's / BFL's layout);
  rendered: the same pixels and latents, bit for bit, as from the single file;
- rendered by diffusers' from_pretrained of the same folder: latents within 1e-4 of their largest magnitude, PNGs
  within 2 levels on 99% of the pixels (tests/test_sd3_pipeline.py's tolerances and reasons);
- saved in shards (index json) and as a hub snapshot in a fake HF cache (offline): the same weights.
The layout rules themselves: flux_layouts.to_diffusers equals tests/test_flux_model.bfl_to_diffusers (written
independently); every diffusers name maps back to the tensor it came from.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from _fixtures_dit import dit_components, dit_dir, flux_pipeline, sd3_pipeline, tiny_flux, tiny_sd3  # noqa: F401
from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from test_pipeline_oracle import FinalLatents
from test_sd3_pipeline import assert_latents_close, assert_pixels_close, first_draws
from test_flux_pipeline import conds as flux_conds
from test_flux_pipeline import diffusers_run
from test_sd3_pipeline import conds as sd3_conds
from test_sd3_pipeline import pixels
from sdcli import pipeline as P
from sdcli.cli import app
from sdcli.loading import checkpoint as ck
from sdcli.runtime.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse", "blurry, low quality"


@pytest.fixture(scope="module")
def sd3_folder(tiny_sd3, clip_tokenizer_dir, dit_dir):  # noqa: F811
    pipe = sd3_pipeline(tiny_sd3, clip_tokenizer_dir)
    folder = dit_dir / "sd35-diffusers"
    if not folder.exists():
        pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def flux_folder(tiny_flux, dit_components, clip_tokenizer_dir, dit_dir):  # noqa: F811
    pipe = flux_pipeline(tiny_flux, dit_components, clip_tokenizer_dir, dev=True)
    folder = dit_dir / "flux1-dev-diffusers"
    if not folder.exists():
        pipe.save_pretrained(folder)
    return folder


def flux_files(components):
    return dict(vae=components["vae"], text_files={"clip_l": components["clip_l"], "t5": components["t5"]})


def states(models) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v for k, v in models.unet.state_dict().items()}
    out.update({f"vae.{k}": v for k, v in models.vae.state_dict().items()})
    for n, enc in enumerate(models.text_encoders):
        out.update({f"text{n}.{k}": v for k, v in enc.state_dict().items()} if enc is not None else {})
    return out


def assert_same_weights(a, b) -> None:
    sa, sb = states(a), states(b)
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]


def test_sd3_folder_loads_the_single_files_weights(sd3_folder, tiny_sd3):  # noqa: F811
    assert (sd3_folder / "transformer" / "config.json").is_file() and (sd3_folder / "text_encoder_3").is_dir()
    info = ck.detect(sd3_folder)
    assert info.family == "sd3" and info.unet == ck.detect(tiny_sd3).unet and len(info.texts) == 3
    assert_same_weights(ck.load_models(sd3_folder), ck.load_models(tiny_sd3))
    shown = CliRunner().invoke(app, ["inspect", str(sd3_folder)])
    assert shown.exit_code == 0 and "sd3" in shown.output, shown.output


def test_flux_folder_loads_the_bfl_files_weights(flux_folder, tiny_flux, dit_components):  # noqa: F811
    assert (flux_folder / "transformer").is_dir() and not (flux_folder / "text_encoder_3").exists()
    assert ck.detect(flux_folder).family == "flux"
    assert_same_weights(ck.load_models(flux_folder), ck.load_models(tiny_flux, **flux_files(dit_components)))


# --- rendering: sdcli from the folder vs diffusers from the folder, and vs sdcli from the single file ---------------

def test_sd3_folder_renders_as_diffusers_from_pretrained(sd3_folder):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder)
    pipe.set_progress_bar_config(disable=True)
    models = ck.load_models(sd3_folder)
    plan = P.make_plan("euler", "auto", 3, cfg=5.0, family=models.family, size=(SIZE, SIZE))
    cond, uncond = sd3_conds(models, PROMPT, NEGATIVE)
    latents = P.txt2img(models, plan, cond, uncond, [7, 8], SIZE, SIZE)
    final = FinalLatents()
    out = pipe([PROMPT] * 2, negative_prompt=[NEGATIVE] * 2, height=SIZE, width=SIZE, num_inference_steps=3,
               guidance_scale=5.0, latents=first_draws([7, 8]), output_type="pil", callback_on_step_end=final)
    assert_latents_close(latents, final.latents)
    assert_pixels_close(pixels(models, latents), [np.asarray(im) for im in out.images])


def test_flux_folder_renders_as_diffusers_from_pretrained(flux_folder):
    """dev: distilled guidance 3.5, T5 padded to 512 (the model card's; FluxPipeline's default)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_folder)
    pipe.set_progress_bar_config(disable=True)
    models = ck.load_models(flux_folder)
    plan = P.make_plan("euler", "auto", 3, family=models.family, size=(SIZE, SIZE))
    cond, uncond = flux_conds(models, PROMPT, None, None)
    latents = P.txt2img(models, plan, cond, uncond, [4], SIZE, SIZE)
    ref_latents, ref_images = diffusers_run(pipe, [4], 3, guidance_scale=3.5)
    assert_latents_close(latents, ref_latents)
    assert_pixels_close(pixels(models, latents), ref_images)


def render(model, out, *extra: str) -> tuple[np.ndarray, torch.Tensor]:
    """`sdcli generate` of one 64x64 image: (its pixels, its --latent-out tensor)."""
    result = CliRunner().invoke(app, ["generate", PROMPT, "-m", str(model), "-o", str(out), "--steps", "2",
                                      "-W", str(SIZE), "-H", str(SIZE), "--seed", "11", *extra,
                                      "--latent-out", str(out.with_suffix(".safetensors"))])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out)), load_file(str(out.with_suffix(".safetensors")))["latent"]


@pytest.mark.parametrize("which", ["sd3", "flux"])
def test_folder_and_single_file_render_the_same_bytes(which, sd3_folder, flux_folder, tiny_sd3, tiny_flux,  # noqa: F811
                                                      dit_components, tmp_path):  # noqa: F811
    if which == "sd3":
        single, folder, extra = tiny_sd3, sd3_folder, ()
    else:
        single, folder = tiny_flux, flux_folder
        extra = ("--vae", str(dit_components["vae"]), "--clip-l", str(dit_components["clip_l"]),
                 "--t5", str(dit_components["t5"]))
    a_pixels, a_latent = render(folder, tmp_path / "folder.png")
    b_pixels, b_latent = render(single, tmp_path / "single.png", *extra)
    assert a_pixels.tobytes() == b_pixels.tobytes() and len(np.unique(a_pixels)) > 16
    assert torch.equal(a_latent, b_latent)


# --- shards, hub ids, broken folders ------------------------------------------------------------------------------

def test_sharded_transformer_and_t5_load_the_same_weights(sd3_folder, tmp_path):
    """diffusers' and transformers' own sharded save (an index json beside the shards) reads as the whole file."""
    from diffusers import SD3Transformer2DModel
    from transformers import T5EncoderModel

    folder = tmp_path / "sharded"
    shutil.copytree(sd3_folder, folder)
    shutil.rmtree(folder / "transformer")
    shutil.rmtree(folder / "text_encoder_3")
    SD3Transformer2DModel.from_pretrained(sd3_folder / "transformer").save_pretrained(
        folder / "transformer", max_shard_size="200KB")
    T5EncoderModel.from_pretrained(sd3_folder / "text_encoder_3").save_pretrained(
        folder / "text_encoder_3", max_shard_size="200KB")
    for part, stem in (("transformer", "diffusion_pytorch_model"), ("text_encoder_3", "model")):
        index = json.loads((folder / part / f"{stem}.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1
    assert_same_weights(ck.load_models(folder), ck.load_models(sd3_folder))


def test_hub_id_resolves_to_a_cached_snapshot_offline(sd3_folder, tmp_path, monkeypatch):
    """`-m owner/name` finds the snapshot in the HF cache (the cache's own layout: refs/main names the snapshot)."""
    from fnmatch import fnmatch

    from sdcli.families import hub_patterns

    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--stabilityai--stable-diffusion-3.5-medium"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(sd3_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))  # read once, at import
    models = ck.load_models("stabilityai/stable-diffusion-3.5-medium")
    assert models.info.family == "sd3" and models.source == repo / "snapshots" / commit
    assert_same_weights(models, ck.load_models(sd3_folder))
    wanted = ["transformer/diffusion_pytorch_model.safetensors", "text_encoder_3/model-00001-of-00002.safetensors",
              "transformer/diffusion_pytorch_model-00002-of-00003.safetensors", "text_encoder_2/model.safetensors",
              "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/diffusion_pytorch_model.safetensors"]
    assert all(any(fnmatch(f, p) for p in hub_patterns()) for f in wanted)


def test_a_missing_piece_of_a_fused_tensor_is_named(sd3_folder, tmp_path):  # noqa: F811
    folder = tmp_path / "broken"
    shutil.copytree(sd3_folder, folder)
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state["transformer_blocks.1.attn.to_k.weight"]
    save_file(state, str(weights))
    with pytest.raises(BadInputError, match=r"transformer_blocks\.1\.attn\.to_k\.weight is missing.*"
                                            r"joint_blocks\.1\.x_block\.attn\.qkv\.weight"):
        ck.load_models(folder)
    result = CliRunner().invoke(app, ["generate", "a cat", "-m", str(folder), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 3 and "to_k" in result.stderr


# --- the layout rules -----------------------------------------------------------------------------------------------

def test_flux_rules_equal_the_independent_converter(tiny_flux):  # noqa: F811
    """flux_layouts.to_diffusers (the rules dit_folders inverts) gives what tests/test_flux_model.bfl_to_diffusers
    gives, bit for bit, and every diffusers name maps back to its BFL tensor."""
    from test_flux_model import bfl_to_diffusers

    from sdcli.formats import dit_folders, flux_layouts
    from sdcli.models.flux import config_from_shapes

    state = load_file(str(tiny_flux))
    cfg = config_from_shapes({k: tuple(v.shape) for k, v in state.items()})
    ours, ref = flux_layouts.to_diffusers(state), bfl_to_diffusers(state, cfg)
    assert ours.keys() == ref.keys() and all(torch.equal(ours[k], ref[k]) for k in ref)
    back = {k: dit_folders.stored_name(k, "flux_dit", cfg.depth) for k in ours}
    assert None not in back.values() and set(back.values()) == set(state)


@pytest.mark.parametrize("stored", [torch.float16, torch.float32])
@pytest.mark.parametrize("target", [torch.bfloat16, torch.float32])
def test_pieces_stream_into_the_fused_tensor(tmp_path, stored, target):
    """An Entry made of pieces (three whole tensors; one tensor's halves swapped) streams, for any block size, and
    reads whole (get), as the concatenation of the stored rows."""
    from sdcli.formats import dit_folders
    from sdcli.formats.diffusers import open_source

    g = torch.Generator().manual_seed(0)
    parts = {n: torch.randn(4, 3, generator=g).to(stored) for n in ("q", "k", "v")}
    parts["mod"] = torch.randn(6, generator=g).to(stored)
    save_file(parts, tmp_path / "w.safetensors")
    source = open_source(tmp_path / "w.safetensors")
    found = source.entries
    cases = {"qkv": (dit_folders.composed("qkv", ("q", "k", "v"), "qkv", found, tmp_path),
                     torch.cat([parts["q"], parts["k"], parts["v"]])),
             "mod": (dit_folders.composed("mod", ("mod",), "swap", found, tmp_path),
                     torch.cat([parts["mod"][3:], parts["mod"][:3]]))}
    for name, (entry, want) in cases.items():
        source.entries[name] = entry
        assert entry.shape == want.shape
        assert torch.equal(source.get(name), want)
        for piece in (1, 3, 5, 100):
            out = torch.full(want.shape, float("nan"), dtype=target)
            blocks = list(source.stream(name, out, piece))
            assert torch.equal(out, want.to(target)) and sum(b.numel() for b in blocks) == want.numel()
    source.close()


def test_convert_quantizes_the_folder_as_the_single_file(sd3_folder, tiny_sd3, tmp_path):  # noqa: F811
    """`convert --quantize` reads the folder through the same entries (the fused tensors from their pieces): every
    GGUF tensor the same bytes as from the single file, which only adds T5's embedding under its second name
    (real files carry both; transformers saves one). CLIP-L's projection, unused by SD3, is the identity in the
    folder (tests/_fixtures_dit.py gives diffusers one, as its single-file loader does)."""
    from sdcli.app.convert import run_convert
    from sdcli.formats.diffusers import open_source

    for src, out in ((sd3_folder, tmp_path / "folder.gguf"), (tiny_sd3, tmp_path / "single.gguf")):
        run_convert(src, out, overwrite=False, quantize="q8_0", convs=False)
    a, b = open_source(tmp_path / "folder.gguf"), open_source(tmp_path / "single.gguf")
    assert set(b.entries) - set(a.entries) == {"text_encoders.t5xxl.transformer.encoder.embed_tokens.weight"}
    assert set(a.entries) < set(b.entries)
    dits = [k for k in a.entries if k.startswith("model.diffusion_model.")]
    assert any(a.entries[k].quantized for k in dits)
    for k in set(a.entries) - {"text_encoders.clip_l.transformer.text_projection.weight"}:
        qa, qb = (s.quantized(k).raw if s.entries[k].quantized else s.get(k) for s in (a, b))
        assert torch.equal(qa, qb), k
    a.close(), b.close()

"""LoRA files on FLUX.1 and SD3.5, in the formats people have, against diffusers' own LoRA loading on the same tiny
random models (tests/_fixtures_dit.py): the LoRA is loaded with ``pipe.load_lora_weights`` (PEFT, run-time adapters,
weight 0.8 through ``set_adapters``) and with sdcli's --lora merge, then txt2img is compared as the parity tests do
(tests/test_flux_pipeline.py, tests/test_sd3_pipeline.py): latents within 1e-4 of their largest magnitude, PNGs
within 2 levels on 99% of the pixels. diffusers adds B(A(x)) beside the layer where sdcli adds B @ A into the
weight: the same sum in another order, far below that bound.

Formats: FLUX kohya (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te1_`` CLIP-L, alphas; diffusers converts
it itself), AI-toolkit / diffusers-PEFT (``transformer.transformer_blocks.0.attn.to_q.lora_A``: row blocks of our
fused qkv and linear1, the swapped final modulation; alpha in the file's lora_adapter_metadata), XLabs; SD3.5
diffusers-PEFT (transformer, text_encoder, text_encoder_2) and kohya (sd-scripts lora_sd3.py names, which diffusers
cannot read: its oracle is the same LoRA written as PEFT keys, down shared and up split by rows, as diffusers'
own kohya-FLUX converter does it). Two gaps of the oracle are bridged the same way, and said where: diffusers'
kohya-FLUX converter hard-codes FLUX.1's full widths for ``linear1``, and it drops T5 keys (T5 is compared against
transformers' T5 with the update merged by hand).
Also: --lora and <lora:name:w> through the CLI with the hash in the metadata, a GGUF-quantized FLUX with the LoRA
added at run time = the LoRA merged into its dequantized weights (bit for bit), wrong-family LoRAs exit 3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from _fixtures_dit import (dit_components, dit_dir, flux_pipeline, sd3_pipeline, t5_model, tiny_flux,  # noqa: F401
                           tiny_sd3)  # fmt: skip
from _fixtures_pipeline import clip_tokenizer_dir, one_thread  # noqa: F401
from test_pipeline_oracle import FinalLatents
from test_sd3_pipeline import assert_latents_close, assert_pixels_close, first_draws, pixels
from sdcli import pipeline as P
from sdcli.app.refine import sized
from sdcli.cli import app
from sdcli.config import RunConfig
from sdcli.formats.hashing import a1111_lora_hash, file_sha256
from sdcli.formats.sd3_layouts import diffusers_names
from sdcli.loading import checkpoint as ck
from sdcli.loading.lora import LoraSpec, LoraState
from sdcli.models.flux import pack, unpack
from sdcli.output.metadata import read_image_metadata
from sdcli.runtime.errors import BadInputError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, STEPS, WEIGHT, RANK = 64, 2, 0.8, 4
PROMPT = "a photo of an astronaut riding a horse"


def _pair(g: torch.Generator, out: int, rest: tuple[int, ...], rank: int = RANK) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) of one module: down (rank, in[, kh, kw]), up (out, rank[, 1, 1])."""
    down = torch.randn(rank, *rest, generator=g) * 0.25
    up = torch.randn(out, rank, *((1, 1) if len(rest) == 3 else ()), generator=g) * 0.25
    return down, up


def _shape(module: torch.nn.Module, name: str) -> tuple[int, ...]:
    """A diffusers / transformers module's weight shape; transformers 5 no longer nests CLIP under text_model."""
    try:
        return tuple(module.get_submodule(name).weight.shape)
    except AttributeError:
        return tuple(module.get_submodule(name.removeprefix("text_model.")).weight.shape)


def _peft_file(path: Path, pipe, names: dict[str, list[str]], alphas: dict[str, float], seed: int,
               text_model: bool = True) -> Path:  # fmt: skip
    """A diffusers/AI-toolkit PEFT file: lora_A / lora_B of each {component: [module names]}, each component's
    LoraConfig (r, lora_alpha) in the lora_adapter_metadata as diffusers' save_lora_weights writes it."""
    from peft import LoraConfig

    g, state, meta = torch.Generator().manual_seed(seed), {}, {}
    for component, modules in names.items():
        keys = [name if text_model else name.removeprefix("text_model.") for name in modules]
        for name, key in zip(modules, keys):
            shape = _shape(getattr(pipe, component), name)
            down, up = _pair(g, shape[0], shape[1:])
            state[f"{component}.{key}.lora_A.weight"], state[f"{component}.{key}.lora_B.weight"] = down, up
        config = LoraConfig(r=RANK, lora_alpha=alphas[component], target_modules=sorted(keys)).to_dict()
        meta.update({f"{component}.{k}": list(v) if isinstance(v, set) else v for k, v in config.items()})
    save_file(state, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta, default=str)})
    return path


def _with_lora(pipe, source, name: str):
    """diffusers' pipe with the LoRA loaded as adapter `name` at WEIGHT (every component it adapts)."""
    pipe.load_lora_weights(source, adapter_name=name)
    pipe.set_adapters([name], adapter_weights=[WEIGHT])
    return pipe


def _sdcli(path: Path, models, weight: float = WEIGHT):
    state = LoraState(models)
    [report] = state.use([LoraSpec(path, weight)])
    return report


# --- FLUX.1 dev ------------------------------------------------------------------------------------------------------

def flux_models(tiny_flux, components):  # noqa: F811
    return ck.load_models(tiny_flux, vae=components["vae"], text_files={"clip_l": components["clip_l"],
                                                                        "t5": components["t5"]})


@pytest.fixture(scope="module")
def flux_pipe(tiny_flux, dit_components, clip_tokenizer_dir):  # noqa: F811
    return flux_pipeline(tiny_flux, dit_components, clip_tokenizer_dir, dev=True)


def flux_run(pipe, models, seed: int = 5):
    """(ours, diffusers') final latents and pixels of one txt2img."""
    cond, _ = P.encode_text(models, PROMPT, None)
    cond, _ = sized(models, RunConfig(), (cond, None), (SIZE, SIZE))
    cond = P.with_guidance(models, cond, None)
    plan = P.make_plan("euler", "auto", STEPS, family=models.family, size=(SIZE, SIZE))
    latents = P.txt2img(models, plan, cond, None, [seed], SIZE, SIZE)
    final = FinalLatents()
    out = pipe([PROMPT], height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=pack(first_draws([seed])),
               guidance_scale=3.5, output_type="pil", callback_on_step_end=final)  # fmt: skip
    ref = unpack(final.latents, SIZE // 8, SIZE // 8)
    return latents, pixels(models, latents), ref, [np.asarray(im) for im in out.images]


def assert_flux_matches(pipe, models, base: torch.Tensor | None = None) -> torch.Tensor:
    latents, images, ref, ref_images = flux_run(pipe, models)
    assert_latents_close(latents, ref)
    assert_pixels_close(images, ref_images)
    if base is not None:  # the LoRA changed the image by far more than the tolerance
        assert (latents - base).abs().max() > 1e-2 * base.abs().max()
    return latents


@pytest.fixture(scope="module")
def flux_base(flux_pipe, tiny_flux, dit_components):  # noqa: F811
    """The render without a LoRA (diffusers and sdcli agree on it: test_flux_pipeline.py)."""
    return flux_run(flux_pipe, flux_models(tiny_flux, dit_components))[0]


AI_TOOLKIT = {
    "transformer": [
        *(f"transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_k_proj",
                                                "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj",
                                                "ff_context.net.2", "norm1.linear")),
        "transformer_blocks.1.attn.add_q_proj", "transformer_blocks.1.attn.add_v_proj",
        *(f"single_transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp",
                                                       "proj_out", "norm.linear")),
        "single_transformer_blocks.1.attn.to_v", "norm_out.linear", "x_embedder", "context_embedder",
        "time_text_embed.guidance_embedder.linear_1",
    ],
    "text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1"],
}  # fmt: skip


def test_flux_ai_toolkit_peft_lora_matches_diffusers(flux_pipe, flux_base, tiny_flux, dit_components,  # noqa: F811
                                                     tmp_path):
    """diffusers' split q/k/v (and a single block's q/k/v/proj_mlp) land in their rows of our fused weights; the
    final modulation's halves swap; alphas come from the metadata (transformer 8 / rank 4, text encoder 2 / 4).
    transformers 5 names CLIP without ``text_model.``: the file spells its CLIP keys so that diffusers can load
    them (sdcli reads both spellings)."""
    path = _peft_file(tmp_path / "ait.safetensors", flux_pipe, AI_TOOLKIT, {"transformer": 8.0, "text_encoder": 2.0},
                      seed=11, text_model=False)  # fmt: skip
    models = flux_models(tiny_flux, dit_components)
    report = _sdcli(path, models)
    n = sum(len(v) for v in AI_TOOLKIT.values())
    assert (report.applied, report.total) == (n, n)
    try:
        assert_flux_matches(_with_lora(flux_pipe, str(path), "ait"), models, flux_base)
    finally:
        flux_pipe.unload_lora_weights()


def _kohya_file(path: Path, modules: dict[str, tuple[int, ...]], alphas: dict[str, float], seed: int) -> Path:
    """A kohya file: lora_down / lora_up (+ alpha where given) of each {kohya name: weight shape}."""
    g, state = torch.Generator().manual_seed(seed), {}
    for name, shape in modules.items():
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = _pair(g, shape[0], shape[1:])
        if name in alphas:
            state[f"{name}.alpha"] = torch.tensor(alphas[name])
    save_file(state, str(path))
    return path


def _kohya_names(net: torch.nn.Module, prefix: str, names: list[str]) -> dict[str, tuple[int, ...]]:
    return {prefix + n.replace(".", "_"): tuple(net.get_submodule(n).weight.shape) for n in names}


FLUX_KOHYA = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.proj", "double_blocks.1.img_mlp.0",
              "double_blocks.0.img_mod.lin", "double_blocks.1.txt_attn.qkv", "single_blocks.0.linear1",
              "single_blocks.1.linear2", "single_blocks.0.modulation.lin", "final_layer.adaLN_modulation.1",
              "final_layer.linear", "img_in", "guidance_in.in_layer", "time_in.out_layer"]  # fmt: skip
CLIP_KOHYA = ["encoder.layers.0.self_attn.k_proj", "encoder.layers.1.mlp.fc2"]


def _split_rows(down: torch.Tensor, up: torch.Tensor, scale: float, sizes: list[int], names: list[str]) -> dict:
    """One fused LoRA as PEFT modules of the row blocks `sizes` (diffusers' kohya converter, non-sparse case):
    down (times the alpha scale) shared, up split by rows."""
    out = {}
    for name, block in zip(names, up.split(sizes)):
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down * scale, block.contiguous()
    return out


def _diffusers_kohya_flux(path: Path, hidden: int) -> dict:
    """The kohya FLUX file as diffusers reads it (its _convert_kohya_flux_lora_to_diffusers), with three bridges:
    ``linear1`` split here by this model's widths (the converter hard-codes FLUX.1's 3072 / 12288), and the CLIP
    keys written here as PEFT keys of transformers 5's CLIPTextModel (the converter's old ``to_k_lora`` names no
    longer load into it)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    state = load_file(str(path))
    bridged = {}
    for base in sorted({k.split(".")[0] for k in state if "_linear1" in k or k.startswith("lora_te1_")}):
        down, up = state.pop(f"{base}.lora_down.weight"), state.pop(f"{base}.lora_up.weight")
        scale = float(state.pop(f"{base}.alpha", torch.tensor(float(RANK)))) / RANK
        if base.startswith("lora_te1_"):
            name = next(n for n in CLIP_KOHYA if base == "lora_te1_text_model_" + n.replace(".", "_"))
            bridged |= _split_rows(down, up, scale, [up.shape[0]], ["text_encoder." + name])
            continue
        i = int(base.split("_")[4])
        names = [f"transformer.single_transformer_blocks.{i}.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                                            "proj_mlp")]  # fmt: skip
        bridged |= _split_rows(down, up, scale, [hidden] * 3 + [up.shape[0] - 3 * hidden], names)
    converted = _convert_kohya_flux_lora_to_diffusers(state)
    # the converter leaves img_in, time_in, guidance_in and final_layer without their "transformer." prefix, and
    # load_lora_weights then skips them without a word (diffusers 0.42): given their prefix here
    return {k if k.startswith("transformer.") else "transformer." + k: v for k, v in converted.items()} | bridged


def test_flux_kohya_lora_matches_diffusers(flux_pipe, flux_base, tiny_flux, dit_components, tmp_path):  # noqa: F811
    models = flux_models(tiny_flux, dit_components)
    names = _kohya_names(models.unet, "lora_unet_", FLUX_KOHYA)
    names |= _kohya_names(models.text_encoders[0].transformer, "lora_te1_text_model_", CLIP_KOHYA)
    # (no alpha on final_layer: diffusers' converter drops those and scales by 1, where kohya scales by alpha/rank)
    alphas = {"lora_unet_double_blocks_0_img_attn_qkv": 2.0, "lora_unet_single_blocks_0_linear1": 8.0,
              "lora_unet_img_in": 1.0, "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": 2.0}
    path = _kohya_file(tmp_path / "kohya.safetensors", names, alphas, seed=12)
    report = _sdcli(path, models)
    assert (report.applied, report.total) == (len(names), len(names))
    try:
        oracle = _diffusers_kohya_flux(path, models.unet.config.hidden_size)
        assert_flux_matches(_with_lora(flux_pipe, oracle, "kohya"), models, flux_base)
    finally:
        flux_pipe.unload_lora_weights()


def test_flux_xlabs_lora_matches_diffusers(flux_pipe, flux_base, tiny_flux, dit_components, tmp_path):  # noqa: F811
    """XLabs' processor keys: qkv_lora1 / qkv_lora2 the image / text qkv, proj_lora1 / 2 their projections, a single
    block's qkv_lora the q, k, v rows of linear1 (no alpha: scale 1)."""
    models = flux_models(tiny_flux, dit_components)
    d = models.unet.config.hidden_size
    shapes = {"double_blocks.0.processor.qkv_lora1": (3 * d, d), "double_blocks.0.processor.proj_lora2": (d, d),
              "double_blocks.1.processor.qkv_lora2": (3 * d, d), "double_blocks.1.processor.proj_lora1": (d, d),
              "single_blocks.0.processor.qkv_lora": (3 * d, d)}  # fmt: skip
    g, state = torch.Generator().manual_seed(13), {}
    for name, shape in shapes.items():
        state[f"{name}.down.weight"], state[f"{name}.up.weight"] = _pair(g, shape[0], shape[1:])
    path = tmp_path / "xlabs.safetensors"
    save_file(state, str(path))
    report = _sdcli(path, models)
    assert (report.applied, report.total) == (5, 5)
    try:
        assert_flux_matches(_with_lora(flux_pipe, str(path), "xlabs"), models, flux_base)
    finally:
        flux_pipe.unload_lora_weights()


def test_t5_kohya_lora_matches_transformers(tiny_flux, dit_components, tmp_path):  # noqa: F811
    """``lora_te3_`` (sd-scripts' T5 prefix for FLUX and SD3) on T5: diffusers drops T5 LoRA keys, so the oracle is
    transformers' T5EncoderModel with W + 0.8 * alpha / rank * up @ down added by module name here (fp32, within
    1e-5 of the largest magnitude: one matmul order apart)."""
    models = flux_models(tiny_flux, dit_components)
    t5 = models.text_encoders[1]
    modules = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_1",
               "encoder.block.1.layer.0.SelfAttention.o"]  # fmt: skip
    path = _kohya_file(tmp_path / "t5.safetensors", _kohya_names(t5, "lora_te3_", modules),
                       {"lora_te3_encoder_block_0_layer_0_SelfAttention_q": 2.0}, seed=14)  # fmt: skip
    ref = t5_model(load_file(str(dit_components["t5"])))
    state = load_file(str(path))
    with torch.no_grad():
        ids = torch.randint(0, 32000, (2, 19), generator=torch.Generator().manual_seed(3))
        before = t5(ids)
        for name in modules:
            base = "lora_te3_" + name.replace(".", "_")
            scale = float(state.get(f"{base}.alpha", torch.tensor(float(RANK)))) / RANK
            delta = state[f"{base}.lora_up.weight"] @ state[f"{base}.lora_down.weight"]
            ref.get_submodule(name).weight.add_(WEIGHT * scale * delta)
        report = _sdcli(path, models)
        got, want = models.text_encoders[1](ids), ref(input_ids=ids).last_hidden_state
    assert (report.applied, report.total) == (3, 3)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (got - before).abs().max() > 1e-2 * want.abs().max()


# --- SD3.5 (Medium-shaped: dual attention in block 0, q/k norm) ----------------------------------------

@pytest.fixture(scope="module")
def sd3_pipe(tiny_sd3, clip_tokenizer_dir):  # noqa: F811
    return sd3_pipeline(tiny_sd3, clip_tokenizer_dir)


def sd3_run(pipe, models, seed: int = 4):
    cond, uncond = P.encode_text(models, PROMPT, "")
    cond, uncond = sized(models, RunConfig(), (cond, uncond), (SIZE, SIZE))
    plan = P.make_plan("euler", "auto", STEPS, cfg=5.0, family=models.family, size=(SIZE, SIZE))
    latents = P.txt2img(models, plan, cond, uncond, [seed], SIZE, SIZE)
    final = FinalLatents()
    out = pipe([PROMPT], negative_prompt=[""], height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=5.0,
               latents=first_draws([seed]), output_type="pil", callback_on_step_end=final)  # fmt: skip
    return latents, pixels(models, latents), final.latents, [np.asarray(im) for im in out.images]


@pytest.fixture(scope="module")
def sd3_base(sd3_pipe, tiny_sd3):  # noqa: F811
    return sd3_run(sd3_pipe, ck.load_models(tiny_sd3))[0]


def assert_sd3_matches(pipe, models, base: torch.Tensor) -> None:
    latents, images, ref, ref_images = sd3_run(pipe, models)
    assert_latents_close(latents, ref)
    assert_pixels_close(images, ref_images)
    assert (latents - base).abs().max() > 1e-2 * base.abs().max()


SD3_PEFT = {
    "transformer": [
        *(f"transformer_blocks.0.{m}" for m in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj",
                                                "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "attn2.to_k",
                                                "attn2.to_out.0", "ff.net.0.proj", "ff_context.net.2",
                                                "norm1.linear")),
        *(f"transformer_blocks.1.{m}" for m in ("attn.to_v", "attn.add_k_proj", "norm1_context.linear",
                                                "ff.net.2")),
        "norm_out.linear", "pos_embed.proj", "context_embedder", "time_text_embed.text_embedder.linear_1", "proj_out",
    ],
    "text_encoder": ["text_model.encoder.layers.0.self_attn.v_proj"],
    "text_encoder_2": ["text_model.encoder.layers.1.mlp.fc1", "text_model.encoder.layers.0.self_attn.out_proj"],
}  # fmt: skip


def test_sd3_diffusers_peft_lora_matches_diffusers(sd3_pipe, sd3_base, tiny_sd3, tmp_path):  # noqa: F811
    """to_q/to_k/to_v, add_*_proj and attn2's into their rows of the fused qkv; the last block's pre-only context
    modulation and norm_out with their halves swapped; the 2x2 patch conv (LoCon); CLIP-L and CLIP-G."""
    alphas = {"transformer": 2.0, "text_encoder": 8.0, "text_encoder_2": 4.0}
    path = _peft_file(tmp_path / "sd3.safetensors", sd3_pipe, SD3_PEFT, alphas, seed=15, text_model=False)
    models = ck.load_models(tiny_sd3)
    report = _sdcli(path, models)
    n = sum(len(v) for v in SD3_PEFT.values())
    assert (report.applied, report.total) == (n, n)
    try:
        assert_sd3_matches(_with_lora(sd3_pipe, str(path), "peft"), models, sd3_base)
    finally:
        sd3_pipe.unload_lora_weights()


SD3_KOHYA = ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.context_block.attn.proj",
             "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.1.context_block.adaLN_modulation.1",
             "joint_blocks.1.context_block.attn.qkv", "joint_blocks.1.x_block.mlp.fc1",
             "final_layer.adaLN_modulation.1", "x_embedder.proj", "t_embedder.mlp.0"]  # fmt: skip


def _diffusers_kohya_sd3(path: Path, depth: int) -> dict:
    """sd-scripts' SD3 names as PEFT keys of diffusers' SD3Transformer2DModel (diffusers has no converter for
    them): per formats/sd3_layouts.py (checked against diffusers' single-file converter in test_sd3_models.py),
    a fused qkv's up split into the three row blocks with down shared, a swapped modulation's up halves swapped."""
    state, out = load_file(str(path)), {}
    for name in SD3_KOHYA:
        base = "lora_unet_" + name.replace(".", "_")
        down, up = state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"]
        scale = float(state.get(f"{base}.alpha", torch.tensor(float(RANK)))) / RANK
        names, op = diffusers_names(name + ".weight", depth)
        names = ["transformer." + n.removesuffix(".weight") for n in names]
        if op == "swap":
            up = torch.cat(up.chunk(2)[::-1])
        out |= _split_rows(down, up, scale, [up.shape[0] // len(names)] * len(names), names)
    for n, prefix in ((1, "text_encoder."), (2, "text_encoder_2.")):
        for name in CLIP_KOHYA:
            base = f"lora_te{n}_text_model_" + name.replace(".", "_")
            out |= _split_rows(state[f"{base}.lora_down.weight"], state[f"{base}.lora_up.weight"], 1.0,
                               [state[f"{base}.lora_up.weight"].shape[0]], [prefix + "text_model." + name])  # fmt: skip
    return out


def test_sd3_kohya_lora_matches_diffusers(sd3_pipe, sd3_base, tiny_sd3, tmp_path):  # noqa: F811
    models = ck.load_models(tiny_sd3)
    names = _kohya_names(models.unet, "lora_unet_", SD3_KOHYA)
    clip_l, clip_g = models.text_encoders[0].transformer, models.text_encoders[1].transformer
    names |= _kohya_names(clip_l, "lora_te1_text_model_", CLIP_KOHYA)
    names |= _kohya_names(clip_g, "lora_te2_text_model_", CLIP_KOHYA)
    alphas = {"lora_unet_joint_blocks_0_x_block_attn_qkv": 2.0, "lora_unet_final_layer_adaLN_modulation_1": 8.0,
              "lora_unet_x_embedder_proj": 1.0}  # fmt: skip
    path = _kohya_file(tmp_path / "sd3_kohya.safetensors", names, alphas, seed=16)
    report = _sdcli(path, models)
    assert (report.applied, report.total) == (len(names), len(names))
    try:
        oracle = _diffusers_kohya_sd3(path, models.unet.config.depth)
        assert_sd3_matches(_with_lora(sd3_pipe, oracle, "kohya"), models, sd3_base)
    finally:
        sd3_pipe.unload_lora_weights()


# --- the command line, GGUF, wrong families ---------------------------------------------------------------------

def _generate(model: Path, components: dict, out: Path, *args: str, expect: int = 0):
    """One FLUX `generate` (or SD3 when `components` is empty) at 64x64, 2 steps; (result, latent)."""
    files = [x for kind in ("vae", "clip_l", "t5") if kind in components
             for x in (f"--{kind.replace('_', '-')}", str(components[kind]))]  # fmt: skip
    latent = out.with_suffix(".latent.safetensors")
    result = CliRunner().invoke(app, ["generate", *args, "-m", str(model), *files, "--steps", "2", "-W", "64", "-H",
                                      "64", "--seed", "3", "--sampler", "euler", "-o", str(out),
                                      "--latent-out", str(latent)])  # fmt: skip
    assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
    return result, (next(iter(load_file(str(latent)).values())) if expect == 0 else None)


def test_cli_flag_tag_metadata_and_gguf_runtime_lora(flux_pipe, tiny_flux, dit_components, tmp_path):  # noqa: F811
    """--lora FILE:0.8 and <lora:NAME:0.8> give the same image and record the file's hash (sdcli JSON, A1111's
    Lora hashes); on a Q8_0 GGUF of the same DiT, where the LoRA is added to the dequantized weight in each
    forward (its to_q/to_k/to_v into row blocks of the quantized qkv), the bytes of the LoRA merged into the
    dequantized weights as floats."""
    from sdcli.quant.layers import holds_blocks
    from sdcli.quant.quantize import write_gguf

    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    path = _peft_file(lora_dir / "ait_style.safetensors", flux_pipe, AI_TOOLKIT,
                      {"transformer": 8.0, "text_encoder": 2.0}, seed=11, text_model=False)  # fmt: skip
    gguf, deq = tmp_path / "flux1-dev-Q8_0.gguf", tmp_path / "flux1-dev-deq.safetensors"
    write_gguf(gguf, load_file(str(tiny_flux)), "q8_0", arch="flux")
    assert CliRunner().invoke(app, ["convert", str(gguf), "-o", str(deq)]).exit_code == 0

    flag, flag_latent = _generate(deq, dit_components, tmp_path / "flag.png", "a cat", "--lora", f"{path}:0.8")
    n = sum(len(v) for v in AI_TOOLKIT.values())
    assert f"lora ait_style.safetensors: applied {n} of {n} modules (weight 0.8)" in flag.stderr
    meta = read_image_metadata(tmp_path / "flag.png")
    sha = file_sha256(path)
    assert meta["sdcli"]["loras"] == [{"name": "ait_style.safetensors", "sha256": sha, "weight": 0.8, "applied": n,
                                       "modules": n}]  # fmt: skip
    assert f'Lora hashes: "ait_style: {a1111_lora_hash(path)[:12]}"' in meta["raw"]["parameters"]
    # the tag's text is removed as A1111 removes it: "a cat <lora:...>" would leave "a cat ", whose trailing space
    # is a token of its own for T5 (transformers' T5 tokenizer and Forge agree); in front it leaves "a cat"
    tag, tag_latent = _generate(deq, dit_components, tmp_path / "tag.png", "<lora:ait_style:0.8>a cat", "--lora-dir",
                                str(lora_dir))  # fmt: skip
    assert torch.equal(tag_latent, flag_latent)
    assert np.array_equal(pixels_of(tmp_path / "tag.png"), pixels_of(tmp_path / "flag.png"))
    assert read_image_metadata(tmp_path / "tag.png")["sdcli"]["loras"] == meta["sdcli"]["loras"]
    _, plain = _generate(deq, dit_components, tmp_path / "plain.png", "a cat")
    assert (plain - flag_latent).abs().max() > 1e-2 * plain.abs().max()

    _, q_latent = _generate(gguf, dit_components, tmp_path / "q.png", "a cat", "--lora", f"{path}:0.8")
    assert torch.equal(q_latent, flag_latent)
    assert np.array_equal(pixels_of(tmp_path / "q.png"), pixels_of(tmp_path / "flag.png"))
    models = flux_models(gguf, dit_components)
    _sdcli(path, models)
    qkv = models.unet.double_blocks[0].img_attn.qkv
    assert holds_blocks(qkv) and sorted(lora.rows for lora in qkv.loras) == [((0, 0, 32),), ((0, 32, 32),),
                                                                             ((0, 64, 32),)]  # q, k, v rows


def pixels_of(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def _sd1_style(path: Path) -> Path:
    """An SD1 LoRA (UNet in kohya's diffusers spelling, CLIP-L text encoder) whose text half fits FLUX's CLIP-L."""
    g = torch.Generator().manual_seed(17)
    state = {}
    for name, (out, inp) in {"lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320),
                             "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}.items():  # fmt: skip
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = _pair(g, out, (inp,))
    save_file(state, str(path))
    return path


def test_wrong_family_loras_exit_3_in_one_line(flux_pipe, tiny_flux, tiny_sd3, dit_components, tmp_path):  # noqa: F811
    """An SD1 LoRA on FLUX (its text half alone would fit FLUX's CLIP-L: refused, not half applied), a FLUX kohya
    LoRA on SD3.5 (no module matches), a FLUX AI-toolkit LoRA on SD3.5 (diffusers names that SD3 shares, other
    widths): exit 3, one line naming the file, nothing written."""
    flux_kohya = _kohya_file(tmp_path / "flux_kohya.safetensors", {"lora_unet_double_blocks_0_img_attn_qkv": (96, 32)},
                             {}, seed=18)  # fmt: skip
    ait = _peft_file(tmp_path / "flux_ait.safetensors", flux_pipe, AI_TOOLKIT,
                     {"transformer": 8.0, "text_encoder": 2.0}, seed=11, text_model=False)  # fmt: skip
    cases = [(tiny_flux, dit_components, _sd1_style(tmp_path / "sd1.safetensors"), "another family than FLUX.1 dev"),
             (tiny_sd3, {}, flux_kohya, "another family than SD3 / SD3.5"),
             (tiny_sd3, {}, ait, "does not fit the model's")]  # fmt: skip
    for model, components, lora, message in cases:
        out = tmp_path / f"{lora.stem}.png"
        result, _ = _generate(model, components, out, "a cat", "--lora", str(lora), expect=3)
        assert message in result.stderr and lora.name in result.stderr, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.stderr and not out.exists()
    with pytest.raises(BadInputError, match="another family"):
        _sdcli(tmp_path / "sd1.safetensors", flux_models(tiny_flux, dit_components))

"""The FLUX.1 DiT (sdcli.models.flux) against diffusers' FluxTransformer2DModel on the same random weights.

Our model holds Black Forest Labs' file layout; `bfl_to_diffusers` below renames, splits the fused qkv / linear1
matrices and swaps the final layer's (shift, scale) into diffusers' (scale, shift). Tiny configs (the spec's,
with 2 + 2 blocks), fp32. The full-width check of diffusers' own single-file converter (it assumes width 3072) is
tests/slow/test_flux_single_file.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from sdcli.runtime.errors import BadInputError, UnsupportedModelError, UsageError
from sdcli.models.flux import (FluxConfig, FluxModel, config_from_shapes, default_axes_dim, image_ids, pack,
                               text_ids, unpack)  # fmt: skip

TINY = dict(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=40, hidden_size=32, mlp_hidden_dim=128,
            num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 4, 8))  # fmt: skip
RTOL = 1e-6  # of the output's largest magnitude; on this CPU the two agree bit for bit (asserted separately)


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor non-trivially random: weights ~ N(0, 1/fan_in), biases ~ N(0, 0.3^2), norm scales
    1 + N(0, 0.3^2)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        r = torch.randn(p.shape, generator=g)
        out[name] = 1 + 0.3 * r if name.endswith(".scale") else r / p.shape[1] ** 0.5 if p.ndim == 2 else 0.3 * r
    return out


def _linear(out: dict, sd: dict, dst: str, src: str) -> None:
    out[dst + ".weight"] = sd[src + ".weight"]
    if src + ".bias" in sd:
        out[dst + ".bias"] = sd[src + ".bias"]


def _double_block(out: dict, sd: dict, i: int) -> None:
    s, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
    _linear(out, sd, d + "norm1.linear", s + "img_mod.lin")  # (shift, scale, gate) x 2: same order in diffusers
    _linear(out, sd, d + "norm1_context.linear", s + "txt_mod.lin")
    for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
        for part in ("weight", "bias"):
            for name, chunk in zip(names, sd[f"{s}{stream}_attn.qkv.{part}"].chunk(3)):
                out[f"{d}attn.{name}.{part}"] = chunk
    for dst, src in (("norm_q", "img_attn.norm.query_norm"), ("norm_k", "img_attn.norm.key_norm"),
                     ("norm_added_q", "txt_attn.norm.query_norm"), ("norm_added_k", "txt_attn.norm.key_norm")):
        out[f"{d}attn.{dst}.weight"] = sd[f"{s}{src}.scale"]
    for dst, src in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                     ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                     ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):  # fmt: skip
        _linear(out, sd, d + dst, s + src)


def _single_block(out: dict, sd: dict, i: int, cfg: FluxConfig) -> None:
    s, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
    _linear(out, sd, d + "norm.linear", s + "modulation.lin")
    sizes = [cfg.hidden_size] * 3 + [cfg.mlp_hidden_dim]
    for part in ("weight", "bias"):
        chunks = sd[f"{s}linear1.{part}"].split(sizes)  # q, k, v, then the MLP input
        for name, chunk in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), chunks):
            out[f"{d}{name}.{part}"] = chunk
    out[d + "attn.norm_q.weight"] = sd[s + "norm.query_norm.scale"]
    out[d + "attn.norm_k.weight"] = sd[s + "norm.key_norm.scale"]
    _linear(out, sd, d + "proj_out", s + "linear2")


def bfl_to_diffusers(sd: dict[str, torch.Tensor], cfg: FluxConfig) -> dict[str, torch.Tensor]:
    """A BFL-layout Flux state dict in FluxTransformer2DModel's names (our own converter, written from both)."""
    out: dict[str, torch.Tensor] = {}
    for dst, src in (("x_embedder", "img_in"), ("context_embedder", "txt_in"),
                     ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                     ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                     ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                     ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                     ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                     ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
                     ("proj_out", "final_layer.linear")):  # fmt: skip
        if src + ".weight" in sd:
            _linear(out, sd, dst, src)
    for i in range(cfg.depth):
        _double_block(out, sd, i)
    for i in range(cfg.depth_single_blocks):
        _single_block(out, sd, i, cfg)
    for part in ("weight", "bias"):
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{part}"].chunk(2)
        out[f"norm_out.linear.{part}"] = torch.cat([scale, shift])
    return out


def diffusers_model(cfg: FluxConfig) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        num_single_layers=cfg.depth_single_blocks, attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
        joint_attention_dim=cfg.context_in_dim, pooled_projection_dim=cfg.vec_in_dim,
        guidance_embeds=cfg.guidance_embed, axes_dims_rope=list(cfg.axes_dim),
    ).eval()  # fmt: skip


def pair(cfg: FluxConfig, seed: int = 0) -> tuple[FluxModel, FluxTransformer2DModel]:
    ours = FluxModel(cfg).eval()
    sd = random_state(ours, seed)
    ours.load_state_dict(sd, strict=True)
    ref = diffusers_model(cfg)
    ref.load_state_dict(bfl_to_diffusers(sd, cfg), strict=True)
    return ours, ref


def inputs(cfg: FluxConfig, seed: int, batch: int = 2, n_img: int = 12, n_txt: int = 7, real_ids: bool = False):
    g = torch.Generator().manual_seed(seed)
    if real_ids:  # (0, row, col) for a 4x6 patch grid, zeros for text: axis 0 never turns
        img_id, txt_id = image_ids(8, 6), text_ids(n_txt)
        n_img = len(img_id)
    else:  # arbitrary positions on all three axes, so every RoPE channel matters
        img_id = torch.randint(0, 40, (n_img, 3), generator=g).float()
        txt_id = torch.randint(0, 40, (n_txt, 3), generator=g).float()
    return dict(
        img=torch.randn(batch, n_img, cfg.in_channels, generator=g), img_ids=img_id,
        txt=torch.randn(batch, n_txt, cfg.context_in_dim, generator=g), txt_ids=txt_id,
        t=torch.rand(batch, generator=g), y=torch.randn(batch, cfg.vec_in_dim, generator=g),
        guidance=(1 + 4 * torch.rand(batch, generator=g)) if cfg.guidance_embed else None,
    )  # fmt: skip


def run_both(ours, ref, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        a = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])
        b = ref(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"], timestep=x["t"],
                img_ids=x["img_ids"], txt_ids=x["txt_ids"], guidance=x["guidance"], return_dict=False)[0]  # fmt: skip
    return a, b


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and torch.isfinite(b).all() and b.abs().max() > 0.5, "degenerate oracle output"
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= RTOL, f"max |ours - diffusers| / max |diffusers| = {err:.2e}"


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("variant", ["dev", "schnell", "fill"])
def test_matches_diffusers_fp32(variant):
    cfg = FluxConfig(**{**TINY, "guidance_embed": variant == "dev",
                        "in_channels": 24 if variant == "fill" else 16})  # fill: more inputs than outputs
    ours, ref = pair(cfg, seed=1)
    a, b = run_both(ours, ref, inputs(cfg, seed=2))
    assert_close(a, b)


def test_bit_identical_here_with_real_ids():
    """Same kernels, same operation order: on this CPU the outputs are equal bit for bit (the tolerance above
    only allows for other BLAS builds summing in another order)."""
    cfg = FluxConfig(**TINY)
    ours, ref = pair(cfg, seed=3)
    a, b = run_both(ours, ref, inputs(cfg, seed=4, real_ids=True))
    assert torch.equal(a, b), f"max |diff| {float((a - b).abs().max()):.3e}"


def test_batch_ids_equal_shared_ids():
    cfg = FluxConfig(**TINY)
    ours, _ = pair(cfg, seed=5)
    x = inputs(cfg, seed=6)
    with torch.no_grad():
        shared = ours(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])
        per_image = ours(x["img"], x["img_ids"].expand(2, -1, -1), x["txt"], x["txt_ids"].expand(2, -1, -1),
                         x["t"], x["y"], x["guidance"])  # fmt: skip
    assert torch.equal(shared, per_image)


def test_weights_matter_everywhere():
    """Guard against a parity test that passes because some weight is unused: perturbing any one tensor of our
    model (norm scales and the guidance embedder included) changes the output."""
    cfg = FluxConfig(**{**TINY, "depth": 1, "depth_single_blocks": 1})
    ours, _ = pair(cfg, seed=7)
    x = inputs(cfg, seed=8)
    args = (x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])
    with torch.no_grad():
        base = ours(*args)
        for name, p in ours.named_parameters():
            p.add_(0.5)
            assert not torch.allclose(ours(*args), base), f"{name} does not reach the output"
            p.sub_(0.5)


def test_dev_needs_guidance_and_schnell_ignores_it():
    dev = FluxModel(FluxConfig(**TINY)).eval()
    x = inputs(dev.config, seed=9)
    with pytest.raises(UsageError, match="guidance"):
        dev(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], None)
    schnell = FluxModel(FluxConfig(**{**TINY, "guidance_embed": False})).eval()
    assert not hasattr(schnell, "guidance_in")
    with torch.no_grad():
        a = schnell(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], None)
        b = schnell(x["img"], x["img_ids"], x["txt"], x["txt_ids"], x["t"], x["y"], x["guidance"])
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- packing and ids

def test_pack_unpack_and_ids_match_diffusers():
    g = torch.Generator().manual_seed(10)
    latent = torch.randn(2, 16, 6, 10, generator=g)  # a 48x80 px image
    packed = pack(latent)
    assert torch.equal(packed, FluxPipeline._pack_latents(latent, 2, 16, 6, 10))
    assert torch.equal(unpack(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    assert torch.equal(unpack(packed, 6, 10), latent)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10), ref_ids)
    assert torch.equal(text_ids(5), torch.zeros(5, 3))
    # channel-first inside each 2x2 patch: feature c*4 + dy*2 + dx of token (row, col)
    assert packed[1, 1 * 5 + 3, 7 * 4 + 1 * 2 + 0] == latent[1, 7, 2 * 1 + 1, 2 * 3 + 0]


def test_latent_velocity_is_the_pipelines_pack_forward_unpack():
    cfg = FluxConfig(**{**TINY, "in_channels": 16})  # 4 latent channels x 2x2
    ours, ref = pair(cfg, seed=11)
    g = torch.Generator().manual_seed(12)
    latent, txt = torch.randn(2, 4, 6, 4, generator=g), torch.randn(2, 7, cfg.context_in_dim, generator=g)
    t, y, guidance = torch.tensor([0.9, 0.4]), torch.randn(2, cfg.vec_in_dim, generator=g), torch.tensor([3.5, 3.5])
    with torch.no_grad():
        got = ours.latent_velocity(latent, t, txt, y, guidance)
        packed = ref(hidden_states=FluxPipeline._pack_latents(latent, 2, 4, 6, 4), encoder_hidden_states=txt,
                     pooled_projections=y, timestep=t, guidance=guidance, return_dict=False,
                     img_ids=FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32),
                     txt_ids=torch.zeros(7, 3))[0]  # fmt: skip
    assert_close(got, FluxPipeline._unpack_latents(packed, 48, 32, 8))


def test_pack_rejects_odd_sides():
    with pytest.raises(UsageError, match="even"):
        pack(torch.zeros(1, 16, 5, 8))
    with pytest.raises(UsageError):
        unpack(torch.zeros(1, 20, 64), 6, 10)


# ----------------------------------------------------------------------------- config from shapes

def _shapes(cfg: FluxConfig, prefix: str = "") -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # a full-size FLUX.1 costs nothing on the meta device
        model = FluxModel(cfg)
    return {prefix + k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("guidance", [True, False])
def test_config_from_real_size_header(guidance):
    real = FluxConfig(guidance_embed=guidance)  # FLUX.1 dev / schnell
    assert config_from_shapes(_shapes(real)) == real
    assert config_from_shapes(_shapes(real, "model.diffusion_model."), "model.diffusion_model.") == real
    fill = FluxConfig(in_channels=384)
    assert config_from_shapes(_shapes(fill)) == fill


def test_config_from_tiny_shapes():
    cfg = FluxConfig(**{**TINY, "in_channels": 24, "depth": 3, "depth_single_blocks": 1, "qkv_bias": False})
    assert config_from_shapes(_shapes(cfg), axes_dim=(4, 4, 8)) == cfg
    assert config_from_shapes(_shapes(cfg)).axes_dim == default_axes_dim(16) == (4, 6, 6)


def test_default_axes_rule():
    assert default_axes_dim(128) == (16, 56, 56)
    for d in (8, 16, 24, 32, 64, 96, 256):
        axes = default_axes_dim(d)
        assert sum(axes) == d and all(a % 2 == 0 and a > 0 for a in axes) and axes[1] == axes[2]
    with pytest.raises(BadInputError):
        default_axes_dim(7)


def test_config_errors():
    shapes = _shapes(FluxConfig(**TINY))
    del shapes["txt_in.weight"]
    with pytest.raises(BadInputError, match="txt_in.weight"):
        config_from_shapes(shapes)
    chroma_like = {k: v for k, v in _shapes(FluxConfig(**TINY)).items() if not k.startswith("vector_in.")}
    with pytest.raises(UnsupportedModelError):
        config_from_shapes(chroma_like)
    with pytest.raises(BadInputError, match="axes"):
        FluxConfig(**{**TINY, "axes_dim": (4, 4, 4)})

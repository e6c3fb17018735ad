"""RaphaelPipeline as a diffusers pipeline: images and diffusion paths, exact save/load round trips, scheduler swaps,
latent mode, LoRA through PEFT (paper §7.8) and the canny ControlNet (paper §7.8)."""

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig

from raphael_ext import RaphaelControlNet, RaphaelPipeline, RaphaelUNet
from raphael_ext.pipelines.paths import plot_attention_maps, plot_space_paths, plot_time_experts
from raphael_ext.pipelines.pipeline_raphael import default_scheduler, load_vae

PROMPTS = ["a red circle", "a blue square above a green triangle"]


def make_pipe(**overrides):
    torch.manual_seed(0)
    pipe = RaphaelPipeline.from_preset("tiny", **overrides)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, steps=3, seed=0, prompts=PROMPTS, **kwargs):
    return pipe(prompts, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np",
                **kwargs).images


def text_states(pipe, prompts=PROMPTS):
    """(states, lengths) of prompts, as the U-Net takes them."""
    states, mask, _, _ = pipe.encode_prompt(prompts, "cpu", do_classifier_free_guidance=False)
    return states, mask.sum(-1)


def nudge(module, std=0.05, parts=("proj_out", "controlnet_", "cond_embedding.layers")):
    """Random weights in zero-initialised outputs (transformer proj_out, ControlNet zero convs; LoRA B with
    parts=("lora_B",)) so that a test can see a transformer's, an adapter's or a ControlNet's effect."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(part in name for part in parts):
                p.normal_(0, std)


@pytest.fixture(scope="module")
def pipe():
    p = make_pipe()
    nudge(p.unet)
    return p


def test_images_paths_and_output_types(pipe, tmp_path):
    result = pipe(PROMPTS, height=32, width=64, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  record_paths=True)
    assert [im.size for im in result.images] == [(64, 32), (64, 32)]
    paths = result.paths
    assert len(paths.timesteps) == 3 and len(paths.space_routes[0]) == pipe.unet.num_transformer_blocks
    assert paths.tokens[0] == ["<start_of_text>", "a", "red", "circle", "<end_of_text>"]
    for plot, name in ((plot_space_paths, "paths.png"), (plot_time_experts, "time.png"),
                       (plot_attention_maps, "attention.png")):
        assert plot(paths, tmp_path / name).stat().st_size > 0
    as_np = images(pipe)
    as_pt = pipe(PROMPTS, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert as_np.shape == (2, 32, 32, 3) and as_np.min() >= 0 and as_np.max() <= 1
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    assert np.array_equal(images(pipe), as_np)  # the same generator, the same images
    assert not np.array_equal(images(pipe, seed=1), as_np)
    latents = pipe(PROMPTS, num_inference_steps=3, output_type="latent").images
    assert latents.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("x", height=31, width=32, num_inference_steps=1)
    with pytest.raises(ValueError, match="output_type"):
        pipe("x", num_inference_steps=1, output_type="jpeg")


def test_save_and_load_reproduce_the_images_exactly(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "RaphaelPipeline" and index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["vae"] == [None, None] and index["controlnet"] == [None, None]
    loaded = RaphaelPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert np.array_equal(images(loaded), images(pipe))
    half = RaphaelPipeline.from_pretrained(tmp_path / "pipe", dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16


def test_any_diffusers_scheduler_swaps_in(pipe):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    original = pipe.scheduler
    try:
        for cls in (DPMSolverMultistepScheduler, EulerDiscreteScheduler):
            pipe.scheduler = cls.from_config(original.config)
            out = images(pipe, steps=4)
            assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()
    finally:
        pipe.scheduler = original


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_the_scheduler_follows_the_prediction_type(prediction_type):
    p = make_pipe(prediction_type=prediction_type)
    assert p.scheduler.config.prediction_type == prediction_type
    with pytest.raises(ValueError, match="scheduler expects 'epsilon'"):
        RaphaelPipeline(p.unet, p.text_encoder, p.tokenizer, default_scheduler(RaphaelUNet.from_preset("tiny")))


def test_latent_mode_with_a_local_vae(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = 4  # stride 8, like Stable Diffusion's VAE
    AutoencoderKL(block_out_channels=(32,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                  up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, norm_num_groups=32,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    p = make_pipe(in_channels=4, out_channels=4, sample_size=8, latent=True)
    with pytest.raises(ValueError, match="needs a vae"):
        p("a yellow star", num_inference_steps=1)
    p = RaphaelPipeline(p.unet, p.text_encoder, p.tokenizer, p.scheduler, vae=vae)
    p.set_progress_bar_config(disable=True)
    assert p("a yellow star", num_inference_steps=2).images[0].size == (64, 64)
    p.save_pretrained(tmp_path / "latent_pipe")
    assert RaphaelPipeline.from_pretrained(tmp_path / "latent_pipe").vae is not None
    vae.save_pretrained(tmp_path / "pickled_vae", safe_serialization=False)
    with pytest.raises(Exception, match="safetensors"):  # a pickled checkpoint is refused, not loaded
        load_vae(tmp_path / "pickled_vae")


# --- LoRA -----------------------------------------------------------------------------------------------------


def lora_config(experts=True):
    return LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                      target_parameters=["experts.w1", "experts.w2"] if experts else None)


def test_lora_on_attention_and_experts(tmp_path):
    from raphael_ext.pipelines.lora import save_lora_weights

    p = make_pipe()
    nudge(p.unet)
    base = images(p)
    base_weights = {k: v.clone() for k, v in p.unet.state_dict().items()}
    p.unet.add_adapter(lora_config())
    names = [n for n, _ in p.unet.named_parameters() if "lora_" in n]
    assert any("self_attn.to_q" in n for n in names) and any("cross.to_out.0" in n for n in names)
    assert any("space_moe.experts" in n for n in names) and any("time_moe.experts" in n for n in names)
    assert np.array_equal(images(p), base)  # a fresh adapter (B = 0) changes nothing

    # Only the adapter trains.
    p.unet.requires_grad_(False)
    for n, param in p.unet.named_parameters():
        param.requires_grad_("lora_" in n)
    nudge(p.unet, parts=("lora_B",))
    x = torch.randn(2, 3, 32, 32)
    states, lengths = text_states(p)
    p.unet(x, torch.tensor([10, 500]), states, lengths).sample.square().mean().backward()
    grads = {n: prm.grad for n, prm in p.unet.named_parameters() if prm.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert any("experts" in n and g.abs().sum() > 0 for n, g in grads.items())

    adapted = images(p)
    assert not np.array_equal(adapted, base)
    p.fuse_lora()
    np.testing.assert_allclose(images(p), adapted, atol=1e-4)  # fused = unfused
    p.unfuse_lora()
    np.testing.assert_allclose(images(p), adapted, atol=1e-4)

    # Saved alone (small), loaded into a fresh pipeline of the same base: the same images; scale 0 = the base.
    state = {f"unet.{k}": v for k, v in p.unet.state_dict().items() if "lora_" in k}
    path = save_lora_weights(tmp_path / "lora", state, {"unet": p.unet.peft_config["default"]})
    assert path.stat().st_size < 0.2 * sum(t.numel() * 4 for t in p.unet.state_dict().values())
    fresh = make_pipe()
    fresh.unet.load_state_dict(base_weights)  # (p's own base weights moved by a rounding in fuse + unfuse)
    assert np.array_equal(images(fresh), base)
    fresh.load_lora_weights(tmp_path / "lora")
    np.testing.assert_allclose(images(fresh), adapted, atol=1e-5)
    fresh.set_adapters(["default"], [0.0])
    np.testing.assert_allclose(images(fresh), base, atol=1e-6)
    fresh.set_adapters(["default"], [1.0])
    fresh.fuse_lora(lora_scale=1.0)
    np.testing.assert_allclose(images(fresh), adapted, atol=1e-4)


def test_lora_on_the_text_tower():
    from raphael_ext.training.trainer import LORA_TEXT_TOWER

    p = make_pipe()
    before, _ = text_states(p)
    p.text_encoder.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=LORA_TEXT_TOWER))
    assert torch.equal(text_states(p)[0], before)
    assert sum("lora_" in n for n, _ in p.text_encoder.named_parameters()) == 4 * 2  # c_fc, c_proj x A, B x 2 layers


# --- ControlNet -----------------------------------------------------------------------------------------------


def test_controlnet_starts_as_identity_and_steers_when_trained(tmp_path):
    p = make_pipe()
    nudge(p.unet)
    base = images(p)
    controlnet = RaphaelControlNet.from_unet(p.unet)
    for name, value in controlnet.state_dict().items():
        if name.startswith(("down.", "mid.", "conv_in.")):
            assert torch.equal(value, p.unet.state_dict()[name])  # the encoder is a copy
    with_cn = RaphaelPipeline(p.unet, p.text_encoder, p.tokenizer, p.scheduler, controlnet=controlnet)
    with_cn.set_progress_bar_config(disable=True)
    control = torch.zeros(2, 3, 32, 32)
    control[:, :, 8:24, 8:24] = 1.0
    assert np.array_equal(images(with_cn, control_image=control), base)  # zero convolutions: no change
    nudge(controlnet, std=0.2)
    steered = images(with_cn, control_image=control)
    assert not np.allclose(steered, base)
    assert np.array_equal(images(with_cn, control_image=control, controlnet_conditioning_scale=0.0), base)
    edges = torch.zeros(2, 1, 32, 32)  # an edge map is taken as it is
    edges[:, :, 8, 8:24] = 1
    assert images(with_cn, control_image=edges).shape == (2, 32, 32, 3)

    with_cn.save_pretrained(tmp_path / "pipe")
    loaded = RaphaelPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.controlnet, RaphaelControlNet)
    assert np.array_equal(images(loaded, control_image=control), steered)
    with pytest.raises(ValueError, match="needs a controlnet"):
        p("x", num_inference_steps=1, control_image=control)


def test_controlnet_of_a_patched_unet_embeds_the_control_at_patch_resolution():
    """A U-Net with patch_size 2 runs its levels at half the sample's size; its ControlNet's residuals must match."""
    p = make_pipe(patch_size=2)
    controlnet = RaphaelControlNet.from_unet(p.unet)
    nudge(controlnet)
    assert controlnet.config.patch_size == 2
    x = torch.randn(2, 3, 32, 32)
    states, lengths = text_states(p)
    down, mid = controlnet(x, torch.tensor([3, 700]), states, lengths, controlnet_cond=torch.rand(2, 1, 32, 32))
    assert [d.shape[-1] for d in down] == [16, 16, 8, 8] and mid.shape[-1] == 8
    out = p.unet(x, torch.tensor([3, 700]), states, lengths, down_block_additional_residuals=down,
                 mid_block_additional_residual=mid)
    assert out.sample.shape == x.shape


def test_controlnet_gradients_reach_only_the_controlnet():
    p = make_pipe()
    nudge(p.unet)
    controlnet = RaphaelControlNet.from_unet(p.unet)
    nudge(controlnet)
    p.unet.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([3, 700])
    states, lengths = text_states(p)
    down, mid = controlnet(x, t, states, lengths, controlnet_cond=torch.rand(2, 1, 32, 32))
    assert len(down) == len(p.unet.skip_widths)
    out = p.unet(x, t, states, lengths, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    out.sample.square().mean().backward()
    assert all(prm.grad is None for prm in p.unet.parameters())
    assert controlnet.cond_embedding.layers[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="down-block residuals"):
        p.unet(x, t, states, lengths, down_block_additional_residuals=down[:-1])

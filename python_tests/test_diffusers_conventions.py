"""RaphaelPipeline and RaphaelUNet called as a diffusers user calls StableDiffusionPipeline and UNet2DConditionModel:
reproducible stochastic sampling from the generator alone, encode_prompt / prompt_embeds, callbacks, guidance
properties, optional components, layerwise casting, one timestep for a batch, diffusers' config names."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

from raphael_ext import RaphaelControlNet, RaphaelPipeline, RaphaelUNet

PROMPTS = ["a red circle", "a blue square"]
TINY = dict(block_out_channels=(32, 64), norm_num_groups=8, edge_channels=8, edge_layers=2)


def nudge(module, parts=("proj_out",)):
    """Random weights in zero-initialised outputs, so the transformer blocks (or LoRA B matrices) have an effect."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(part in name for part in parts):
                p.normal_(0, 0.05)


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = RaphaelPipeline.from_preset("tiny", sample_size=16, **TINY)
    nudge(p.unet)
    p.set_progress_bar_config(disable=True)
    return p


def sample(pipe, seed=0, **kwargs):
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 2, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.mark.parametrize("scheduler, eta", [(DDPMScheduler, 0.0), (DDIMScheduler, 1.0),
                                            (EulerAncestralDiscreteScheduler, 0.0)])
def test_stochastic_sampling_depends_on_the_generator_alone(pipe, scheduler, eta):
    original = pipe.scheduler
    pipe.scheduler = scheduler.from_config(original.config)
    kwargs = {"eta": eta} if eta else {}
    try:
        torch.manual_seed(1)
        first = sample(pipe, **kwargs)
        torch.manual_seed(2)
        assert np.array_equal(sample(pipe, **kwargs), first)
        assert not np.array_equal(sample(pipe, seed=1, **kwargs), first)
    finally:
        pipe.scheduler = original


def test_eta_reaches_ddim(pipe):
    assert not np.allclose(sample(pipe, eta=1.0), sample(pipe, eta=0.0))


def test_initial_noise_is_scaled_by_the_sigma_of_the_inference_schedule(pipe):
    """Euler's init_noise_sigma, sqrt(sigma_max**2 + 1) with "leading" spacing, depends on set_timesteps (those
    steps start below the training schedule's largest sigma), and scale_model_input divides by the same: the U-Net's
    first input is the noise itself only when the noise is scaled after set_timesteps."""
    original = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(original.config, timestep_spacing="leading")
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        noise = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        pipe("a red circle", num_inference_steps=3, latents=noise, guidance_scale=1.0, output_type="latent")
    finally:
        hook.remove()
        pipe.scheduler = original
    torch.testing.assert_close(seen[0], noise)


def test_num_images_per_prompt_and_a_generator_per_image(pipe):
    images = sample(pipe, num_images_per_prompt=2)
    assert images.shape == (4, 16, 16, 3)
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    alone = pipe("a blue square", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(2)).images
    together = pipe(PROMPTS, num_images_per_prompt=2, num_inference_steps=2, output_type="np",
                    generator=generators).images
    # Prompt 1's first image, from generator 2. Not the same bits: BLAS picks its kernels by the batch's size (on an
    # AMD EPYC with MKL, 1.3e-5 apart).
    np.testing.assert_allclose(together[2], alone[0], atol=1e-4)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        pipe(PROMPTS, generator=generators[:3])


def test_encode_prompt_then_prompt_embeds_gives_the_same_images(pipe):
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPTS, negative_prompt="blurry")
    assert embeds.shape[0] == 2 and mask.shape == embeds.shape[:2] and negative.shape == embeds.shape
    from_embeds = sample(pipe, prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                         negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
    assert np.array_equal(from_embeds, sample(pipe, negative_prompt="blurry"))
    with pytest.raises(ValueError, match="exactly one"):
        pipe(PROMPTS, prompt_embeds=embeds)


def test_callback_on_step_end_sees_and_replaces_tensors(pipe):
    calls = []

    def callback(p, step, timestep, tensors):
        calls.append((step, sorted(tensors), p.guidance_scale, p.do_classifier_free_guidance, p.num_timesteps))
        return {"latents": torch.zeros_like(tensors["latents"])} if step == p.num_timesteps - 1 else {}

    out = pipe(PROMPTS, num_inference_steps=3, guidance_scale=3.0, output_type="latent", callback_on_step_end=callback,
               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]).images
    assert calls == [(i, ["latents", "prompt_embeds"], 3.0, True, 3) for i in range(3)]
    assert torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPTS, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["noise"])


def test_guidance_runs_only_above_one(pipe):
    assert np.array_equal(sample(pipe, guidance_scale=0.5), sample(pipe, guidance_scale=1.0))
    assert not np.array_equal(sample(pipe, guidance_scale=2.0), sample(pipe, guidance_scale=1.0))


def test_negative_prompt_list_must_match_the_batch(pipe):
    with pytest.raises(ValueError, match="negative_prompt has 3 entries for 2 prompts"):
        pipe(PROMPTS, negative_prompt=["a", "b", "c"])


def test_a_pipeline_without_unet_encodes_prompts(pipe, tmp_path):
    encoder_only = RaphaelPipeline(unet=None, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                   scheduler=pipe.scheduler)
    embeds, _, _, _ = encoder_only.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    torch.testing.assert_close(embeds, pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)[0])
    with pytest.raises(ValueError, match="unet"):
        encoder_only(PROMPTS)
    encoder_only.save_pretrained(tmp_path)
    assert RaphaelPipeline.from_pretrained(tmp_path).unet is None


# --- the U-Net ---------------------------------------------------------------------------------------------------

def unet_inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randn(batch, 7, 64, generator=g)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = RaphaelUNet(**TINY).eval()
    nudge(model)
    return model


def test_unet_takes_diffusers_arguments_and_one_timestep_for_the_batch(unet):
    x, text = unet_inputs()
    expected = unet(x, torch.tensor([500, 500]), encoder_hidden_states=text).sample
    for timestep in (torch.tensor([500]), torch.tensor(500), 500, 500.0):
        torch.testing.assert_close(unet(x, timestep, encoder_hidden_states=text).sample, expected)
    lengths = torch.tensor([3, 7])
    mask = (torch.arange(7)[None] < lengths[:, None]).long()
    torch.testing.assert_close(unet(x, 500, encoder_hidden_states=text, encoder_attention_mask=mask).sample,
                               unet(x, 500, text, lengths).sample)
    assert isinstance(unet(x, 500, encoder_hidden_states=text, return_dict=False)[0], torch.Tensor)
    with pytest.raises(ValueError, match="timestep must hold 1 or batch = 2"):
        unet(x, torch.tensor([1, 2, 3]), encoder_hidden_states=text)


@pytest.mark.parametrize("with_controlnet", [False, True])
def test_layerwise_casting(with_controlnet):
    torch.manual_seed(0)
    model = RaphaelUNet(**TINY).eval()
    x, text = unet_inputs()
    controlnet = RaphaelControlNet.from_unet(model).eval() if with_controlnet else None
    target = controlnet or model
    t = torch.tensor([10, 10])
    reference = (controlnet(x, t, text, controlnet_cond=torch.ones(2, 1, 16, 16))[1] if controlnet
                 else model(x, t, text).sample)
    target.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    out = (controlnet(x, t, text, controlnet_cond=torch.ones(2, 1, 16, 16))[1] if controlnet
           else model(x, t, text).sample)
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and out.shape == reference.shape


def test_config_uses_diffusers_names_and_old_configs_load(unet, tmp_path):
    assert unet.config.block_out_channels == (32, 64) and unet.config.cross_attention_dim == 64
    unet.save_pretrained(tmp_path / "new")
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert "block_out_channels" in config and "channels" not in config
    old = {LEGACY: config.pop(NEW) for LEGACY, NEW in (("channels", "block_out_channels"),
                                                       ("layers_per_level", "layers_per_block"),
                                                       ("norm_groups", "norm_num_groups"),
                                                       ("text_dim", "cross_attention_dim"),
                                                       ("head_dim", "attention_head_dim"))}
    config.update(old)
    (tmp_path / "new" / "config.json").write_text(json.dumps(config))  # as raphael_ext 0.2 wrote it
    loaded = RaphaelUNet.from_pretrained(tmp_path / "new")
    assert tuple(loaded.config.block_out_channels) == (32, 64) and loaded.config.norm_num_groups == 8
    x, text = unet_inputs()
    assert torch.equal(loaded.eval()(x, 3, text).sample, unet(x, 3, text).sample)
    assert RaphaelUNet.from_config(config).config.layers_per_block == 1
    by_old_keywords = RaphaelUNet(channels=(32, 64), norm_groups=8, edge_channels=8)
    assert by_old_keywords.config.block_out_channels == (32, 64) and by_old_keywords.config.norm_num_groups == 8
    assert tuple(RaphaelUNet.from_config(by_old_keywords.config).config.block_out_channels) == (32, 64)
    with pytest.raises(ValueError, match="both"):
        RaphaelUNet(channels=(32, 64), block_out_channels=(32, 64))
    with pytest.raises(TypeError, match="unknown"):
        RaphaelUNet(bogus=1)


# --- LoRA through the pipeline ------------------------------------------------------------------------------------

def test_lora_adapters_through_the_pipeline(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    source = RaphaelPipeline.from_preset("tiny", sample_size=16, **TINY)
    nudge(source.unet)
    unet_config = LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    text_config = LoraConfig(r=2, lora_alpha=2, target_modules=["c_fc"])
    for name in ("a", "b"):
        source.unet.add_adapter(unet_config, name)
        layers = {}
        if name == "a":  # adapter a also adapts the text encoder
            source.text_encoder.add_adapter(text_config, name)
            nudge(source.text_encoder, parts=("lora_B",))
            layers = dict(text_encoder_lora_layers=get_peft_model_state_dict(source.text_encoder, adapter_name=name),
                          text_encoder_lora_adapter_metadata=text_config.to_dict())
        nudge(source.unet, parts=(f"lora_B.{name}",))
        RaphaelPipeline.save_lora_weights(tmp_path / name, unet_lora_layers=get_peft_model_state_dict(
            source.unet, adapter_name=name), unet_lora_adapter_metadata=unet_config, **layers)

    torch.manual_seed(0)
    pipe = RaphaelPipeline.from_preset("tiny", sample_size=16, **TINY)
    nudge(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    base = sample(pipe)
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b")
    assert pipe.get_list_adapters() == {"unet": ["a", "b"], "text_encoder": ["a"]}

    # Each adapter changes a LoRA'd linear layer by its scale times its delta: both at once add up.
    layer = pipe.unet.get_submodule("down.2.attn.block.self_attn.to_q")
    h = torch.randn(3, layer.in_features)

    def delta(names, scales):
        pipe.set_adapters(names, scales)
        return layer(h) - layer.base_layer(h)

    torch.testing.assert_close(delta(["a", "b"], [0.5, 2.0]), 0.5 * delta(["a"], [1.0]) + 2.0 * delta(["b"], [1.0]))
    pipe.set_adapters(["a", "b"], [0.5, 2.0])
    assert sorted(pipe.get_active_adapters()) == ["a", "b"]
    both = sample(pipe)
    # cross_attention_kwargs={"scale": s} multiplies every adapter's scale, in both components, for one call.
    half = sample(pipe, cross_attention_kwargs={"scale": 0.5})
    assert np.array_equal(sample(pipe), both)
    pipe.set_adapters(["a", "b"], [0.25, 1.0])
    np.testing.assert_allclose(sample(pipe), half, atol=1e-6)
    assert not np.allclose(half, both)
    for alone in (["a"], ["b"]):
        pipe.set_adapters(alone, [1.0])
        assert not np.allclose(sample(pipe), both)
    pipe.set_adapters(["a", "b"], [0.0, 0.0])
    np.testing.assert_allclose(sample(pipe), base, atol=1e-6)
    # The text encoder's adapter is loaded and scaled with the U-Net's.
    states = lambda: pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)[0]  # noqa: E731
    plain = states()
    pipe.set_adapters(["a"], [1.0])
    assert not torch.equal(states(), plain)

    pipe.unload_lora_weights()
    assert np.array_equal(sample(pipe), base) and pipe.get_list_adapters() == {}

    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b")
    pipe.set_adapters(["a", "b"], [0.5, 2.0])
    pipe.fuse_lora()  # fusing and unfusing round the weights: the images move by up to ~1e-5
    np.testing.assert_allclose(sample(pipe), both, atol=1e-4)
    pipe.unfuse_lora()
    np.testing.assert_allclose(sample(pipe), both, atol=1e-4)
    pipe.delete_adapters("b")
    assert pipe.get_list_adapters() == {"unet": ["a"], "text_encoder": ["a"]}

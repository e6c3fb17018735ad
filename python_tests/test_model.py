"""The RAPHAEL model, text encoder, edge targets, pipeline and path pictures (issue: the thin RAPHAEL model)."""

import json

import numpy as np

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("open_clip", reason="the text encoder needs open_clip_torch (not on the GPU device image)")
pytest.importorskip("diffusers", reason="the pipeline needs diffusers (not on the GPU device image)")

from raphael_ext.edges import HEDDetector, sobel_edges  # noqa: E402
from raphael_ext.model import RaphaelConfig, RaphaelUNet  # noqa: E402
from raphael_ext.text import OpenCLIPTextEncoder  # noqa: E402


def tiny(**overrides):
    return RaphaelConfig.preset("tiny", **overrides)


def inputs(config, batch=2, seed=0, lengths=(5, 9)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g)
    t = torch.randint(0, config.num_train_timesteps, (batch,), generator=g)
    text = torch.randn(batch, config.text_tokens, config.text_dim, generator=g)
    return x, t, text, torch.tensor(lengths[:batch])


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_presets_forward_shapes(preset):
    config = RaphaelConfig.preset(preset)
    with torch.device("meta" if preset != "tiny" else "cpu"):
        model = RaphaelUNet(config)
        x, t, text, lengths = (a.to("meta" if preset != "tiny" else "cpu") for a in inputs(config))
        out = model(x, t, text, lengths)
    assert out.sample.shape == x.shape
    blocks = model.num_transformer_blocks
    assert len(out.space_routes) == len(out.time_routes) == len(out.attn_maps) == len(out.pooled_maps) == blocks
    assert out.edge_logits.shape == (x.shape[0], 1, config.sample_size, config.sample_size)
    assert all(r.shape == (x.shape[0], config.text_tokens) for r in out.space_routes)
    assert all(r.shape == (x.shape[0],) for r in out.time_routes)


def test_paper_preset_on_meta():
    config = RaphaelConfig.preset("paper")
    with torch.device("meta"):
        model = RaphaelUNet(config)
    assert model.num_transformer_blocks == 16
    assert config.space_experts == 6 and config.time_experts == 4 and config.text_dim == 1024
    assert 2.5e9 <= model.num_parameters() <= 3.5e9, model.num_parameters()
    with torch.device("meta"):
        x = torch.empty(1, 4, 80, 80)
        out = model(x, torch.zeros(1, dtype=torch.long), torch.empty(1, 77, 1024), torch.tensor([40]))
    assert out.sample.shape == x.shape


def untrained_but_connected(model):
    """proj_out starts at zero (each transformer starts as the identity), which also zeroes every gradient
    inside the blocks at step 0; give it small weights so gradients can be checked."""
    from raphael_ext.model import SpatialTransformer

    for m in model.modules():
        if isinstance(m, SpatialTransformer):
            torch.nn.init.normal_(m.proj_out.weight, std=0.05)
    return model


def test_gradients_reach_gates_and_used_experts():
    torch.manual_seed(0)
    model = untrained_but_connected(RaphaelUNet(tiny(gate_noise=0.0)))
    x, t, text, lengths = inputs(model.config)
    out = model(x, t, text, lengths)
    loss = out.sample.square().mean() + out.edge_logits.square().mean()
    loss.backward()
    for name, module in model.named_modules():
        if name.endswith("space_moe") or name.endswith("time_moe"):
            gate_grads = [p.grad for p in module.gate.parameters()]
            assert all(g is not None and g.abs().sum() > 0 for g in gate_grads), name
    block_index = 0
    for name, module in model.named_modules():
        if name.endswith("space_moe"):
            used = out.space_routes[block_index][torch.arange(model.config.text_tokens) < lengths[:, None]].unique()
            w1 = module.experts[0]
            assert all(w1.grad[k].abs().sum() > 0 for k in used.tolist()), (name, used)
            block_index += 1


def test_eval_routing_is_deterministic():
    model = RaphaelUNet(tiny(gate_noise=0.5)).eval()
    x, t, text, lengths = inputs(model.config)
    with torch.no_grad():
        a, b = model(x, t, text, lengths), model(x, t, text, lengths)
    for ra, rb in zip(a.space_routes + a.time_routes, b.space_routes + b.time_routes):
        assert torch.equal(ra, rb)
    assert torch.equal(a.sample, b.sample)


@pytest.mark.parametrize("switch", ["use_space_moe", "use_time_moe", "use_edge"])
def test_ablation_switches_remove_layers(switch):
    model = RaphaelUNet(tiny(**{switch: False}))
    names = [n for n, _ in model.named_parameters()]
    part = {"use_space_moe": "space_moe.", "use_time_moe": "time_moe.", "use_edge": "edge_head."}[switch]
    assert not any(part in n for n in names)
    out = model(*inputs(model.config))
    if switch == "use_edge":
        assert out.edge_logits is None
    else:
        routes = out.space_routes if switch == "use_space_moe" else out.time_routes
        assert all(r is None for r in routes)


@pytest.mark.parametrize("experts", range(0, 9))
def test_any_number_of_space_experts(experts):
    model = RaphaelUNet(tiny(space_experts=experts, time_experts=min(experts, 4)))
    out = model(*inputs(model.config))
    assert torch.isfinite(out.sample).all()
    if experts:
        assert all(int(r.max()) < experts for r in out.space_routes)


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = untrained_but_connected(RaphaelUNet(tiny(gate_noise=0.0)))
    x, t, text, lengths = inputs(model.config)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_gradient_checkpointing(enabled)
        model(x, t, text, lengths).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = RaphaelUNet(tiny()).eval()
    model.save_pretrained(tmp_path / "unet")
    assert json.loads((tmp_path / "unet" / "config.json").read_text())["space_experts"] == 6
    loaded = RaphaelUNet.from_pretrained(tmp_path / "unet").eval()
    x, t, text, lengths = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(x, t, text, lengths).sample, loaded(x, t, text, lengths).sample)
    assert not list((tmp_path / "unet").glob("*.tmp"))
    with pytest.raises(FileNotFoundError):
        RaphaelUNet.from_pretrained(tmp_path / "missing")


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="unknown fields"):
        RaphaelConfig.from_dict({"channels": [64], "attention_levels": [True], "bogus": 1})
    with pytest.raises(ValueError, match="head_dim"):
        RaphaelConfig(channels=(96,), attention_levels=(True,), head_dim=48, norm_groups=16)
    with pytest.raises(ValueError, match="unknown preset"):
        RaphaelConfig.preset("huge")
    with pytest.raises(ValueError, match="prediction_type"):
        RaphaelConfig(prediction_type="noise")


# --- text encoder ---------------------------------------------------------------------------------------------


def test_text_encoder_offline_random_weights():
    encoder = OpenCLIPTextEncoder("tiny")
    states, lengths = encoder.encode(["a red circle to the left of a blue square", ""])
    assert states.shape == (2, 77, 64)
    assert lengths.tolist()[1] == 2  # start and end tokens only
    assert lengths[0] > lengths[1]
    assert not any(p.requires_grad for p in encoder.parameters())


def test_text_encoder_loads_text_keys_from_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = OpenCLIPTextEncoder("tiny", trainable=True)
    state = {k: v.clone() for k, v in source.tower.state_dict().items()}
    state["visual.conv1.weight"] = torch.zeros(3)  # a full CLIP checkpoint also holds the image tower
    state["logit_scale"] = torch.ones(())
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    torch.manual_seed(2)
    loaded = OpenCLIPTextEncoder("tiny", checkpoint=tmp_path / "open_clip_model.safetensors")
    tokens = loaded.tokenize(["a green triangle"])
    assert torch.equal(source(tokens)[0], loaded(tokens)[0])
    save_file({"token_embedding.weight": torch.zeros(3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks text-tower keys"):
        OpenCLIPTextEncoder("tiny", checkpoint=tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="not a .safetensors"):
        OpenCLIPTextEncoder("tiny", checkpoint=tmp_path / "model.bin")


def test_paper_text_config_is_vit_g_14():
    from raphael_ext.text import text_config

    cfg, embed_dim = text_config("ViT-g-14")
    assert (cfg["width"], cfg["layers"], cfg["context_length"], embed_dim) == (1024, 24, 77, 1024)


# --- edges ----------------------------------------------------------------------------------------------------


def test_sobel_edges_find_a_square_outline():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 1.0
    edges = sobel_edges(image)
    assert edges.shape == (1, 1, 32, 32)
    assert edges[0, 0, 16, 16] == 0 and edges[0, 0, 2, 2] == 0  # flat inside and outside
    assert edges[0, 0, 16, 7:9].max() == 1 and edges[0, 0, 7:9, 16].max() == 1  # on the outline
    with pytest.raises(ValueError, match="expected float images"):
        sobel_edges(torch.zeros(1, 1, 8, 8))


def test_hed_detector_loads_annotator_layout(tmp_path):
    torch.manual_seed(0)
    detector = HEDDetector()
    keys = set(detector.state_dict())
    assert {"norm", "block1.convs.0.weight", "block5.convs.2.bias", "block5.projection.weight"} <= keys
    save_file(detector.state_dict(), str(tmp_path / "hed.safetensors"))
    loaded = HEDDetector.from_file(tmp_path / "hed.safetensors")
    image = torch.rand(1, 3, 32, 48)
    edges = loaded(image)
    assert edges.shape == (1, 1, 32, 48) and torch.all((edges > 0) & (edges < 1))
    torch.testing.assert_close(edges, detector(image))
    with pytest.raises(ValueError, match="safetensors"):
        HEDDetector.from_file(tmp_path / "hed.pth")


# --- pipeline and paths ---------------------------------------------------------------------------------------


def test_pipeline_makes_images_and_paths(tmp_path):
    from raphael_ext.paths import plot_attention_maps, plot_space_paths, plot_time_experts
    from raphael_ext.pipeline import RaphaelPipeline

    torch.manual_seed(0)
    pipe = RaphaelPipeline(RaphaelUNet(tiny()), OpenCLIPTextEncoder("tiny"))
    result = pipe(["a red circle", "a blue square above a green triangle"], height=32, width=64,
                  num_inference_steps=3, guidance_scale=4.5, seed=0, record_paths=True, progress=False)
    assert [im.size for im in result.images] == [(64, 32), (64, 32)]
    paths = result.paths
    assert len(paths.timesteps) == 3 and len(paths.space_routes[0]) == pipe.unet.num_transformer_blocks
    assert paths.tokens[0][0] == "<start_of_text>" and paths.tokens[0][-1] == "<end_of_text>"
    for plot, name in ((plot_space_paths, "paths.png"), (plot_time_experts, "time.png"),
                       (plot_attention_maps, "attention.png")):
        assert plot(paths, tmp_path / name).stat().st_size > 0
    again = pipe(["a red circle", "a blue square above a green triangle"], height=32, width=64,
                 num_inference_steps=3, seed=0, progress=False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(result.images, again.images))
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("x", height=31, width=32, num_inference_steps=1, progress=False)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_pipeline_samples_what_the_model_predicts(prediction_type):
    from raphael_ext.pipeline import RaphaelPipeline, default_scheduler

    unet = RaphaelUNet(tiny(prediction_type=prediction_type))
    assert default_scheduler(unet).config.prediction_type == prediction_type
    with pytest.raises(ValueError, match="scheduler expects 'epsilon'"):
        RaphaelPipeline(unet, OpenCLIPTextEncoder("tiny"), scheduler=default_scheduler(RaphaelUNet(tiny())))


def test_pipeline_latent_mode_with_a_local_vae(tmp_path):
    from diffusers import AutoencoderKL

    from raphael_ext.pipeline import RaphaelPipeline

    torch.manual_seed(0)
    blocks = 4  # stride 8, like Stable Diffusion's VAE
    AutoencoderKL(block_out_channels=(32,) * blocks, down_block_types=("DownEncoderBlock2D",) * blocks,
                  up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, norm_num_groups=32,
                  layers_per_block=1).save_pretrained(tmp_path / "vae")
    vae = RaphaelPipeline.load_vae(tmp_path / "vae")
    unet = RaphaelUNet(tiny(in_channels=4, out_channels=4, sample_size=8, latent=True))
    with pytest.raises(ValueError, match="needs a vae"):
        RaphaelPipeline(unet, OpenCLIPTextEncoder("tiny"))
    pipe = RaphaelPipeline(unet, OpenCLIPTextEncoder("tiny"), vae=vae)
    images = pipe("a yellow star", num_inference_steps=2, progress=False).images
    assert images[0].size == (64, 64)
    vae.save_pretrained(tmp_path / "pickled_vae", safe_serialization=False)
    with pytest.raises(Exception, match="safetensors"):  # a pickled checkpoint is refused, not loaded
        RaphaelPipeline.load_vae(tmp_path / "pickled_vae")

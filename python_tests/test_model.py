"""The RAPHAEL U-Net (a diffusers model), text encoder and tokenizer, edge maps, and the old-folder conversion."""

import json

import pytest
import torch
from safetensors.torch import save_file

from raphael_ext import OpenCLIPTextEncoder, RaphaelUNet
from raphael_ext.models.edges import HEDDetector, canny_edges, sobel_edges
from raphael_ext.models.text_encoder import openclip_tokenizer, tokenize


def tiny(**overrides):
    return RaphaelUNet.from_preset("tiny", **overrides)


def inputs(config, batch=2, seed=0, lengths=(5, 9)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g)
    t = torch.randint(0, config.num_train_timesteps, (batch,), generator=g)
    text = torch.randn(batch, config.text_tokens, config.cross_attention_dim, generator=g)
    return x, t, text, torch.tensor(lengths[:batch])


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_presets_forward_shapes(preset):
    with torch.device("meta" if preset != "tiny" else "cpu"):
        model = RaphaelUNet.from_preset(preset)
        config = model.config
        x, t, text, lengths = (a.to("meta" if preset != "tiny" else "cpu") for a in inputs(config))
        out = model(x, t, text, lengths)
    assert out.sample.shape == x.shape
    blocks = model.num_transformer_blocks
    assert len(out.space_routes) == len(out.time_routes) == len(out.attn_maps) == len(out.pooled_maps) == blocks
    assert out.edge_logits.shape == (x.shape[0], 1, config.sample_size, config.sample_size)
    assert all(r.shape == (x.shape[0], config.text_tokens) for r in out.space_routes)
    assert all(r.shape == (x.shape[0],) for r in out.time_routes)


def test_paper_preset_on_meta():
    with torch.device("meta"):
        model = RaphaelUNet.from_preset("paper")
    config = model.config
    assert model.num_transformer_blocks == 16
    assert config.space_experts == 6 and config.time_experts == 4 and config.cross_attention_dim == 1024
    assert 2.5e9 <= model.num_parameters() <= 3.5e9, model.num_parameters()
    with torch.device("meta"):
        x = torch.empty(1, 4, 80, 80)
        out = model(x, torch.zeros(1, dtype=torch.long), torch.empty(1, 77, 1024), torch.tensor([40]))
    assert out.sample.shape == x.shape


def untrained_but_connected(model):
    """proj_out starts at zero (each transformer starts as the identity), which also zeroes every gradient
    inside the blocks at step 0; give it small weights so gradients can be checked."""
    from raphael_ext.models.unet import SpatialTransformer

    for m in model.modules():
        if isinstance(m, SpatialTransformer):
            torch.nn.init.normal_(m.proj_out.weight, std=0.05)
    return model


def test_gradients_reach_gates_and_used_experts():
    torch.manual_seed(0)
    model = untrained_but_connected(tiny(gate_noise=0.0))
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
            w1 = module.experts.w1
            assert all(w1.grad[k].abs().sum() > 0 for k in used.tolist()), (name, used)
            block_index += 1


def test_eval_routing_is_deterministic():
    model = tiny(gate_noise=0.5).eval()
    x, t, text, lengths = inputs(model.config)
    with torch.no_grad():
        a, b = model(x, t, text, lengths), model(x, t, text, lengths)
    for ra, rb in zip(a.space_routes + a.time_routes, b.space_routes + b.time_routes):
        assert torch.equal(ra, rb)
    assert torch.equal(a.sample, b.sample)


@pytest.mark.parametrize("switch", ["use_space_moe", "use_time_moe", "use_edge"])
def test_ablation_switches_remove_layers(switch):
    model = tiny(**{switch: False})
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
    model = tiny(space_experts=experts, time_experts=min(experts, 4))
    out = model(*inputs(model.config))
    assert torch.isfinite(out.sample).all()
    if experts:
        assert all(int(r.max()) < experts for r in out.space_routes)


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    model = untrained_but_connected(tiny(gate_noise=0.0))
    x, t, text, lengths = inputs(model.config)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing() if enabled else model.disable_gradient_checkpointing()
        model(x, t, text, lengths).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_patch_size_runs_the_same_network_on_folded_pixels():
    """patch_size=2 is exactly the patch-1 network run on pixel_unshuffle(x) (4x the channels, half the height and
    width) with its prediction unfolded again; the edge head (which answers for 2x2 pixels at a time) still gives
    logits at the sample's full resolution."""
    torch.manual_seed(0)
    patched = untrained_but_connected(tiny(patch_size=2, gate_noise=0.0)).eval()
    folded = tiny(in_channels=12, out_channels=12, sample_size=16, gate_noise=0.0).eval()
    shared = {k: v for k, v in patched.state_dict().items() if not k.startswith("edge_head.")}
    missing, _ = folded.load_state_dict(shared, strict=False)
    assert missing and all(k.startswith("edge_head.") for k in missing)
    x, t, text, lengths = inputs(patched.config)
    with torch.no_grad():
        out = patched(x, t, text, lengths)
        reference = folded(torch.nn.functional.pixel_unshuffle(x, 2), t, text, lengths)
    torch.testing.assert_close(out.sample, torch.nn.functional.pixel_shuffle(reference.sample, 2))
    assert out.sample.shape == x.shape and out.edge_logits.shape == (2, 1, 32, 32)
    assert out.attn_maps[0].shape[1] == (32 // 4) ** 2  # the attention level runs at 1/2 of 1/2
    assert patched.sample_stride == 4
    with pytest.raises(ValueError, match="patch_size"):
        tiny(patch_size=0)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = tiny().eval()
    model.save_pretrained(tmp_path / "unet")
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "RaphaelUNet" and config["space_experts"] == 6
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = RaphaelUNet.from_pretrained(tmp_path / "unet").eval()
    x, t, text, lengths = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(x, t, text, lengths).sample, loaded(x, t, text, lengths).sample)
    half = RaphaelUNet.from_pretrained(tmp_path / "unet", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    with torch.no_grad():
        out = half(x.bfloat16(), t, text.bfloat16(), lengths).sample
    torch.testing.assert_close(out.float(), model(x, t, text, lengths).sample, atol=0.05, rtol=0.05)
    with pytest.raises(OSError):
        RaphaelUNet.from_pretrained(tmp_path / "missing")


def write_legacy_unet(model, folder):
    """`model` as raphael_ext 0.1 wrote it: RaphaelConfig's config.json and model.safetensors with the fused self-attention
    projection (qkv, proj) and the expert parameter lists (experts.0..3)."""
    from raphael_ext.models.unet import LEGACY_EXPERT_NAMES

    state = model.state_dict()
    legacy = {}
    for key, value in state.items():
        if ".self_attn.to_q." in key:
            prefix = key.split("self_attn.")[0]
            legacy[f"{prefix}qkv.weight"] = torch.cat([state[f"{prefix}self_attn.{n}.weight"] for n in ("to_q", "to_k", "to_v")])
        elif ".self_attn.to_k." in key or ".self_attn.to_v." in key:
            continue
        elif ".self_attn.to_out.0." in key:
            legacy[key.replace(".self_attn.to_out.0.", ".proj.")] = value
        elif ".experts." in key:
            old = {v: k for k, v in LEGACY_EXPERT_NAMES.items()}[key.rsplit(".", 1)[1]]
            legacy[f"{key.rsplit('.', 1)[0]}.{old}"] = value
        else:
            legacy[key] = value
    folder.mkdir(parents=True)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    (folder / "config.json").write_text(json.dumps({**config, "text_encoder": "tiny"}))
    save_file(legacy, str(folder / "model.safetensors"))


def test_legacy_folder_loads_with_renamed_weights(tmp_path):
    """A raphael_ext 0.1 folder gives the same outputs as the model it was written from."""
    torch.manual_seed(0)
    model = tiny().eval()
    write_legacy_unet(model, tmp_path / "unet_ema")
    loaded = RaphaelUNet.from_pretrained(tmp_path / "unet_ema").eval()
    x, t, text, lengths = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(model(x, t, text, lengths).sample, loaded(x, t, text, lengths).sample)


def test_convert_turns_a_legacy_run_into_a_pipeline(tmp_path):
    """python -m raphael_ext convert RUN OUT: the run's EMA U-Net and the random text tower it saved become a
    pipeline folder whose text encoder is that tower."""
    import subprocess
    import sys

    from raphael_ext import RaphaelPipeline

    torch.manual_seed(0)
    model = tiny().eval()
    write_legacy_unet(model, tmp_path / "run" / "unet_ema")
    tower = OpenCLIPTextEncoder("tiny")
    save_file({f"text.{k}": v for k, v in tower.tower.state_dict().items()},
              str(tmp_path / "run" / "text_encoder.safetensors"))
    subprocess.run([sys.executable, "-P", "-m", "raphael_ext", "convert", str(tmp_path / "run"),
                    str(tmp_path / "pipeline")], check=True, capture_output=True)
    pipe = RaphaelPipeline.from_pretrained(tmp_path / "pipeline")
    ids = tokenize(pipe.tokenizer, ["a red circle"])
    assert torch.equal(pipe.text_encoder(ids)[0], tower(ids)[0])
    x, t, text, lengths = inputs(model.config)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, text, lengths).sample, model(x, t, text, lengths).sample)


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="unknown arguments"):
        RaphaelUNet.from_preset("tiny", bogus=1)
    with pytest.raises(ValueError, match="head_dim"):
        RaphaelUNet(channels=(96,), attention_levels=(True,), head_dim=48, norm_groups=16)
    with pytest.raises(ValueError, match="unknown preset"):
        RaphaelUNet.from_preset("huge")
    with pytest.raises(ValueError, match="prediction_type"):
        RaphaelUNet(prediction_type="noise")


# --- text encoder ---------------------------------------------------------------------------------------------


def test_text_encoder_offline_random_weights():
    encoder = OpenCLIPTextEncoder("tiny")
    states, lengths = encoder.encode(openclip_tokenizer(), ["a red circle to the left of a blue square", ""])
    assert states.shape == (2, 77, 64) and not states.requires_grad
    assert lengths.tolist()[1] == 2  # start and end tokens only
    assert lengths[0] > lengths[1]


def test_tokenizer_gives_open_clip_ids():
    """transformers' CLIPTokenizer with open_clip's vocabulary: open_clip's ids up to the end-of-text token, and the
    text encoder zeroes the padding as open_clip pads."""
    from open_clip.tokenizer import SimpleTokenizer

    reference = SimpleTokenizer(context_length=77)
    tokenizer = openclip_tokenizer()
    prompts = ["a red circle to the left of a blue square", "Two GREEN triangles!!", "", "héllo wörld, it's 3:15pm",
               "a " * 100, "<tag> don't 😀"]
    ids = tokenize(tokenizer, prompts)
    expected = reference(prompts)
    lengths = expected.argmax(dim=-1) + 1
    for row, want, n in zip(ids, expected, lengths):
        assert torch.equal(row[:n], want[:n])
    encoder = OpenCLIPTextEncoder("tiny")
    states, got_lengths = encoder(ids)
    assert torch.equal(got_lengths, lengths)
    torch.testing.assert_close(states, encoder.tower(expected)[1])


def test_text_encoder_follows_autograd_when_trainable():
    """encode() builds a graph through a tower being fine-tuned (the old encode was always @no_grad)."""
    encoder = OpenCLIPTextEncoder("tiny")
    assert not encoder.trainable  # frozen when built, as the paper's tower
    encoder.requires_grad_(True)
    states, _ = encoder.encode(openclip_tokenizer(), ["a red circle"])
    assert states.requires_grad
    states.square().mean().backward()
    assert encoder.tower.token_embedding.weight.grad.abs().sum() > 0
    encoder.requires_grad_(False)
    assert not encoder.encode(openclip_tokenizer(), ["a red circle"])[0].requires_grad


def test_text_encoder_loads_text_keys_from_checkpoint(tmp_path):
    torch.manual_seed(1)
    source = OpenCLIPTextEncoder("tiny")
    state = {k: v.clone() for k, v in source.tower.state_dict().items()}
    state["text_projection"] = torch.zeros(64, 64)  # the CLIP head RAPHAEL does not use
    state["visual.conv1.weight"] = torch.zeros(3)  # a full CLIP checkpoint also holds the image tower
    state["logit_scale"] = torch.ones(())
    save_file(state, str(tmp_path / "open_clip_model.safetensors"))
    torch.manual_seed(2)
    loaded = OpenCLIPTextEncoder.from_open_clip("tiny", tmp_path / "open_clip_model.safetensors")
    ids = tokenize(openclip_tokenizer(), ["a green triangle"])
    assert torch.equal(source(ids)[0], loaded(ids)[0])
    loaded.save_pretrained(tmp_path / "text_encoder")
    again = OpenCLIPTextEncoder.from_pretrained(tmp_path / "text_encoder")
    assert torch.equal(again(ids)[0], loaded(ids)[0])
    save_file({"token_embedding.weight": torch.zeros(3)}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ValueError, match="lacks text-tower keys"):
        OpenCLIPTextEncoder.from_open_clip("tiny", tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="not a .safetensors"):
        OpenCLIPTextEncoder.from_open_clip("tiny", tmp_path / "model.bin")


def test_paper_text_config_is_vit_g_14():
    from raphael_ext.models.text_encoder import text_config

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


def test_canny_edges_are_thin_outlines():
    """A filled square gives a closed one-pixel-wide outline (non-maximum suppression), nothing inside or outside;
    a faint edge next to a strong one survives through hysteresis, a faint isolated one does not."""
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, 8:24, 8:24] = 1.0
    edges = canny_edges(image, sigma=0)
    assert edges.shape == (1, 1, 32, 32) and set(edges.unique().tolist()) <= {0.0, 1.0}
    assert edges[0, 0, 12:20, 12:20].sum() == 0 and edges[0, 0, :5].sum() == 0
    row = edges[0, 0, 16]
    assert 1 <= row[5:11].sum() <= 2 and 1 <= row[21:27].sum() <= 2  # thin on each side
    # A vertical step at column 16: strong (1.0) in the top half, weak (0.2) in the bottom half.
    mixed = torch.zeros(1, 3, 32, 32)
    mixed[:, :, :16, 16:] = 1.0
    mixed[:, :, 16:, 16:] = 0.2
    weak_part = canny_edges(mixed, low=0.05, high=0.3, sigma=0)[0, 0, 20:28, 14:18]
    assert (weak_part.sum(dim=1) >= 1).all()  # kept: connected to the strong part
    isolated = mixed.clone()
    isolated[:, :, :16, 16:] = 0.2  # the same weak step with no strong part
    assert canny_edges(isolated, low=0.05, high=0.3, sigma=0).sum() == 0
    assert canny_edges(isolated, low=0.05, high=0.1, sigma=0).sum() > 0
    with pytest.raises(ValueError, match="low <= high"):
        canny_edges(image, low=0.5, high=0.1)


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

"""The paper's analyses in miniature (evaluation/analysis.py, evaluation/quality.py): the route classifier on paths
whose answer is known, time-expert statistics on hand-built routes, FID against closed forms, and analyze and
guidance_sweep end to end on a tiny random pipeline."""

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy import linalg
from torch import nn

from raphael_ext import RaphaelPipeline
from raphael_ext.evaluation.analysis import (ConceptPrompt, analyze, find_token, load_word_lists, record_concept_paths,
                                             route_classifier, shapes_concept_prompts, time_expert_shares)
from raphael_ext.evaluation.evaluate import evaluate
from raphael_ext.evaluation.quality import (InceptionFeatures, OpenCLIPScore, ShapesFeatureNet, frechet_distance,
                                            guidance_sweep, shapes_feature_net)
from raphael_ext.pipelines.paths import DiffusionPaths
from raphael_ext.training.data import COLORS, ShapesDataset


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    p = RaphaelPipeline.from_preset("tiny")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def feature_net(feature_cache):
    return shapes_feature_net(feature_cache, steps=20)


def synthetic_paths(rng, classes, per_class, blocks=4, experts=6, separable=True):
    """Expert ids per block; with separable=True block 0's expert is the class, the other blocks are noise."""
    labels = np.repeat([f"c{i}" for i in range(classes)], per_class)
    features = rng.integers(0, experts, size=(len(labels), blocks))
    if separable:
        features[:, 0] = np.repeat(np.arange(classes), per_class)
    return features, labels


def test_the_classifier_names_separable_paths():
    features, labels = synthetic_paths(np.random.default_rng(0), classes=4, per_class=20)
    result = route_classifier(features, labels, folds=5, seed=0)
    assert result["accuracy"] >= 0.95 and result["chance"] == 0.25 and result["samples"] == 80
    assert result["classes"] == ["c0", "c1", "c2", "c3"]
    confusion = np.array(result["confusion"])
    assert confusion.sum(1).tolist() == [20] * 4  # every path tested once, in its fold
    assert np.trace(confusion) >= 76


def test_the_classifier_is_at_chance_on_random_paths():
    features, labels = synthetic_paths(np.random.default_rng(1), classes=3, per_class=30, separable=False)
    result = route_classifier(features, labels, folds=5, seed=0)
    assert result["chance"] == pytest.approx(1 / 3)
    assert abs(result["accuracy"] - result["chance"]) < 0.2


def test_the_folds_are_stratified_and_seeded():
    rng = np.random.default_rng(2)
    features, labels = synthetic_paths(rng, classes=3, per_class=10)
    features[rng.random(len(labels)) < 0.4, 0] = 0  # some paths ambiguous, so the folds' draw shows in the result
    assert route_classifier(features, labels, seed=3) == route_classifier(features, labels, seed=3)
    assert any(route_classifier(features, labels, seed=s) != route_classifier(features, labels, seed=3) for s in (4, 5))
    # Unbalanced classes: the majority class sets the chance level; a class needs a sample in every fold.
    result = route_classifier(features[:25], labels[:25], folds=5)
    assert result["chance"] == pytest.approx(10 / 25)
    with pytest.raises(ValueError, match="fewer than the 5 folds"):
        route_classifier(features[:24], labels[:24], folds=5)


def test_find_token_follows_bpe_pieces():
    tokens = ["<start_of_text>", "a", "Fluffy</w>", "xy", "lo", "phone", "<end_of_text>"]
    assert find_token(tokens, "fluffy") == 2
    assert find_token(tokens, "xylophone") == 3
    assert find_token(tokens, "<end_of_text>") == 6
    with pytest.raises(ValueError, match="not among the tokens"):
        find_token(tokens, "xylophones")


def route_table(*experts_per_step):
    """time_routes [step][block] -> [B] from per-step rows of (block experts per prompt)."""
    return [[None if e is None else torch.tensor(e) for e in step] for step in experts_per_step]


def test_time_expert_shares_on_hand_built_routes():
    # Block 0: expert 2 for the first 6 of 10 steps, then expert 1. Block 1: 2, 1, 2 for 3, 3, 4 steps. Block 2: off.
    block0, block1 = [2] * 6 + [1] * 4, [2] * 3 + [1] * 3 + [2] * 4
    run = DiffusionPaths(tokens=[["a"]], timesteps=list(range(900, -1, -100)),
                         time_routes=route_table(*[([a], [b], None) for a, b in zip(block0, block1)]))
    stats = time_expert_shares(run)
    assert stats["steps"] == 10 and stats["prompts"] == 1 and [b["block"] for b in stats["blocks"]] == [0, 1]
    first, second = stats["blocks"]
    assert first["shares"] == pytest.approx({"1": 0.4, "2": 0.6}) and first["handover"] == pytest.approx(0.6)
    assert first["first_expert"] == 2 and first["experts_by_step"] == block0
    assert second["shares"] == pytest.approx({"1": 0.3, "2": 0.7}) and second["handover"] == pytest.approx(0.3)
    # Over prompts and runs: a second run whose block 0 keeps expert 2 for 8 steps, and one that never switches.
    other = DiffusionPaths(tokens=[["a"], ["b"]], timesteps=run.timesteps,
                           time_routes=route_table(*[([a, 2], [b, b], None)
                                                     for a, b in zip([2] * 8 + [1] * 2, block1)]))
    pooled = time_expert_shares([run, other])["blocks"][0]
    assert pooled["handover"] == pytest.approx((0.6 + 0.8 + 1.0) / 3)
    assert pooled["shares"] == pytest.approx({"1": 6 / 30, "2": 24 / 30})
    with pytest.raises(ValueError, match="time-MoE is off"):
        time_expert_shares(DiffusionPaths(tokens=[["a"]], timesteps=[1], time_routes=[[None, None]]))


def test_shapes_concept_prompts_look_like_training_captions():
    prompts = shapes_concept_prompts(samples_per_concept=6, seed=0)
    assert prompts == shapes_concept_prompts(samples_per_concept=6, seed=0)
    assert sorted(prompts["color"]) == sorted(COLORS) and sorted(prompts["count"]) == ["one", "three", "two"]
    assert sorted(prompts["relation"]) == ["above", "below", "left", "right"]
    for family, by_concept in prompts.items():
        for concept, items in by_concept.items():
            assert len(items) == 6
            for item in items:
                words = item.prompt.replace(",", "").split()
                assert item.prompt.startswith("a ") and (family == "count" or concept in words)
    assert all(item.word == "<end_of_text>" for item in prompts["count"]["two"])
    assert all(", and a " in item.prompt for item in prompts["count"]["three"])
    assert all(" of " not in item.prompt and len(item.prompt.split()) == 3 for item in prompts["count"]["one"])
    assert all(" to the left of a " in item.prompt for item in prompts["relation"]["left"])
    # The concept's word sits at different places: not every colour prompt starts with it.
    assert len({item.prompt.split().index("red") for item in prompts["color"]["red"]}) > 1


def test_word_lists_from_a_file(tmp_path):
    path = tmp_path / "words.json"
    path.write_text(json.dumps({"texture": {"fluffy": ["a {concept} dog", "a Fluffy cat"], "shiny": ["a shiny car"]}}))
    lists = load_word_lists(path)
    assert lists["texture"]["fluffy"] == [ConceptPrompt("a fluffy dog", "fluffy"),
                                          ConceptPrompt("a Fluffy cat", "fluffy")]
    path.write_text(json.dumps({"relation": {"to the left of": ["a cat to the left of a dog"]}}))
    with pytest.raises(ValueError, match="must be one word"):
        load_word_lists(path)
    path.write_text(json.dumps({"texture": {"shiny": ["a dull car"]}}))
    with pytest.raises(ValueError, match="lacks the word"):
        load_word_lists(path)


class Identity(nn.Module):
    """A 'feature network' that passes [N, d] vectors through, so FID is computed on known samples."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x


def closed_form_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * linalg.sqrtm(cov_a @ cov_b).real))


def test_fid_against_closed_forms():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(4000, 3, generator=generator, dtype=torch.float64)
    assert abs(frechet_distance(real, real, Identity(3))) < 1e-3
    # N(0, I) against N((1, 2, 0), 4 I): |mu|^2 = 5 plus trace 3 * (1 + 4 - 2 * 2) = 3, so FID = 8.
    fake = 2 * torch.randn(4000, 3, generator=generator, dtype=torch.float64) + torch.tensor([1.0, 2.0, 0.0])
    fid = frechet_distance(real, fake, Identity(3), batch=1000)
    assert fid == pytest.approx(closed_form_fid(real.numpy(), fake.numpy()), rel=1e-4)
    assert fid == pytest.approx(8.0, abs=0.4)


def test_the_shapes_feature_net_is_cached_and_tells_renders_from_noise(feature_net, feature_cache):
    loaded = shapes_feature_net(feature_cache, steps=20)
    assert loaded.scene_accuracy == feature_net.scene_accuracy
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), feature_net.state_dict().values()))
    renders = [torch.stack([(ShapesDataset(48, 32, seed=s)[i]["image"] + 1) / 2 for i in range(48)]) for s in (1, 2)]
    noisy = (renders[1] + 0.3 * torch.randn(renders[1].shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert feature_net(torch.rand(2, 3, 64, 64)).shape == (2, ShapesFeatureNet.num_features)  # any size is resized
    assert frechet_distance(renders[0], renders[1], feature_net) < frechet_distance(renders[0], noisy, feature_net)


def test_inception_features_are_never_downloaded_nor_unpickled(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        InceptionFeatures(tmp_path / "pt_inception.safetensors")
    (tmp_path / "pt_inception.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):  # a pickle is refused even when it exists
        InceptionFeatures(tmp_path / "pt_inception.pth")
    if importlib.util.find_spec("torch_fidelity") is None:  # with it, a real local file would be loaded
        (tmp_path / "pt_inception.safetensors").write_bytes(b"")
        with pytest.raises(ImportError, match="torch-fidelity"):
            InceptionFeatures(tmp_path / "pt_inception.safetensors")


def test_concept_paths_are_the_pipelines_routes(pipe):
    features, labels = record_concept_paths(pipe, {"red": [ConceptPrompt("a blue square above a red circle", "red")]})
    recorded = pipe(["a blue square above a red circle"], num_inference_steps=2, record_paths=True).paths
    red = recorded.tokens[0].index("red")
    assert labels == ["red"] and features.tolist() == [[r[0, red].item() for r in recorded.space_routes[-1]]]


def test_analyze_on_a_tiny_pipeline(pipe, tmp_path):
    words = tmp_path / "words.json"
    words.write_text(json.dumps({"mine": {"fluffy": [f"a fluffy {n}" for n in ("dog", "cat", "cow", "owl", "fox")],
                                          "shiny": [f"a shiny {n}" for n in ("car", "coin", "ring", "cup", "key")]}}))
    report = analyze(pipe, tmp_path / "out", families=["count"], word_lists=words, samples_per_concept=5, steps=3)
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert sorted(saved["route_classifier"]) == ["count", "mine"]
    for family, result in saved["route_classifier"].items():
        assert {"accuracy", "accuracy_std", "chance", "samples", "classes", "confusion"} <= set(result)
        assert (tmp_path / "out" / f"routes_{family}.png").stat().st_size > 0
    assert saved["route_classifier"]["count"]["samples"] == 15
    assert saved["route_classifier"]["mine"]["classes"] == ["fluffy", "shiny"]
    times = saved["time_experts"]
    assert times["steps"] == 3 and len(times["blocks"]) == pipe.unet.num_transformer_blocks
    assert all(sum(block["shares"].values()) == pytest.approx(1.0) for block in times["blocks"])
    assert (tmp_path / "out" / "time_experts.png").stat().st_size > 0


def test_guidance_sweep_on_a_tiny_pipeline(pipe, feature_net, tmp_path):
    report = guidance_sweep(pipe, tmp_path, guidances=(1.5, 4.5), count=4, steps=2, feature=feature_net)
    saved = json.loads((tmp_path / "guidance_sweep.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert [p["guidance"] for p in saved["points"]] == [1.5, 4.5]
    assert all(set(p) == {"guidance", "alignment", "alignment_stderr", "fid"} for p in saved["points"])
    assert saved["fid_features"].startswith("shapes-CNN") and saved["fid_floor"] >= 0
    assert (tmp_path / "guidance_sweep.png").stat().st_size > 0
    # The sweep's alignment is evaluate()'s figure at the same count, steps and guidance.
    assert saved["points"][1]["alignment"] == evaluate(pipe, tmp_path / "eval", count=4, steps=2,
                                                       guidance_scale=4.5)["alignment"]


def test_evaluate_reports_each_kind_of_check(pipe, tmp_path):
    rates = evaluate(pipe, tmp_path, count=8, steps=2)["checks_passed"]
    assert {"color", "shape"} <= set(rates) <= {"color", "shape", "relation"}
    assert all(0.0 <= rate <= 1.0 for rate in rates.values())
    assert rates["shape"] <= rates["color"]  # a shape is judged on the blob of its colour: no blob, no shape
    assert json.loads((tmp_path / "eval.json").read_text())["checks_passed"] == rates


def test_cli_analyze_and_guidance_sweep(pipe, feature_net, tmp_path, monkeypatch):
    """python -m raphael_ext analyze / evaluate --guidance a,b on a pipeline folder (the sweep's feature net is the
    module's small one, to keep the test short)."""
    import raphael_ext.evaluation.quality as quality
    from raphael_ext.__main__ import main

    pipe.save_pretrained(tmp_path / "pipe")
    main(["analyze", "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "analysis"), "--families",
          "color", "--samples", "5", "--steps", "2", "--folds", "2"])
    report = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert set(report["route_classifier"]) == {"color"} and report["time_experts"]["steps"] == 2
    monkeypatch.setattr(quality, "shapes_feature_net", lambda cache_dir=None, **kwargs: feature_net)
    main(["evaluate", "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "sweep"), "--guidance", "1,4",
          "--count", "4", "--steps", "2"])
    sweep = json.loads((tmp_path / "sweep" / "guidance_sweep.json").read_text())
    assert [point["guidance"] for point in sweep["points"]] == [1.0, 4.0]
    assert (tmp_path / "sweep" / "guidance_sweep.png").is_file()


TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised open_clip model small enough for CI, registered under its own name, and its state dict
    as a .safetensors checkpoint."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("clip")
    (folder / "raphael-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "raphael-test-clip.json")
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("raphael-test-clip")
    save_file(model.state_dict(), str(folder / "clip.safetensors"))
    return model.eval(), preprocess, folder / "clip.safetensors"


def test_clip_score_is_open_clips_cosine(tiny_clip):
    """100 * max(cos, 0) between open_clip's own image features (its PIL preprocessing) and text features."""
    import open_clip
    from PIL import Image

    model, preprocess, checkpoint = tiny_clip
    scorer = OpenCLIPScore("raphael-test-clip", checkpoint)
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 32, 32), generator=generator, dtype=torch.uint8)
    prompts = ["a red circle", "two blue squares", "a green triangle left of a yellow star", "x", "", "an orange"]
    with torch.no_grad():
        pil = torch.stack([preprocess(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in images])
        cosine = F.cosine_similarity(model.encode_image(pil),
                                     model.encode_text(open_clip.get_tokenizer("raphael-test-clip")(prompts)))
    scores = scorer(images.float() / 255, prompts)
    torch.testing.assert_close(scores, 100 * cosine.clamp_min(0), atol=1e-3, rtol=1e-4)
    assert scorer(images[:0].float(), []).shape == (0,)
    with pytest.raises(ValueError, match="N prompts"):
        scorer(images.float() / 255, prompts[:2])


def test_clip_score_loads_only_safetensors_of_that_model(tiny_clip, tmp_path):
    _, _, checkpoint = tiny_clip
    with pytest.raises(ValueError, match="not a .safetensors"):
        OpenCLIPScore("raphael-test-clip", tmp_path / "clip.bin")
    save_file({"visual.proj": torch.zeros(64, 32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="does not hold"):
        OpenCLIPScore("raphael-test-clip", tmp_path / "other.safetensors")


def test_guidance_sweep_on_prompts_of_your_own(pipe, feature_net, tiny_clip, tmp_path):
    """A user's captions: CLIP score instead of the judge, FID against the given images, no floor."""
    scorer = OpenCLIPScore("raphael-test-clip", tiny_clip[2])
    real = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    prompts = ["a red circle", "two blue squares", "a cat", "never used: count is 3"]
    with pytest.raises(ValueError, match="clip_score"):
        guidance_sweep(pipe, tmp_path, guidances=(1.5,), count=3, steps=2, feature=feature_net, prompts=prompts)
    report = guidance_sweep(pipe, tmp_path, guidances=(1.5, 4.5), count=3, steps=2, feature=feature_net,
                            prompts=prompts, clip_score=scorer, real_images=real)
    assert all(set(p) == {"guidance", "clip_score", "clip_score_stderr", "fid"} for p in report["points"])
    assert report["prompts"] == 3 and report["fid_floor"] is None
    assert report["clip_score_model"] == "CLIP score (raphael-test-clip)"
    assert all(0 <= p["clip_score"] <= 100 for p in report["points"])
    assert (tmp_path / "guidance_sweep.png").stat().st_size > 0


def test_cli_guidance_sweep_on_a_caption_folder(pipe, feature_net, tiny_clip, tmp_path, monkeypatch, capsys):
    """evaluate --data FOLDER --clip-model --clip-checkpoint --inception-weights (Inception stood in for by the small
    feature net): the folder's captions are the prompts, its images the FID reference."""
    import raphael_ext.evaluation.quality as quality
    from PIL import Image
    from raphael_ext.__main__ import main

    pipe.save_pretrained(tmp_path / "pipe")
    data = tmp_path / "data"
    data.mkdir()
    for i, caption in enumerate(["a red circle", "a blue square", "a green star"]):
        Image.new("RGB", (160, 160), (40 * i, 80, 200)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    monkeypatch.setattr(quality, "InceptionFeatures", lambda path: feature_net)
    common = ["evaluate", "--pipeline", str(tmp_path / "pipe"), "--out", str(tmp_path / "sweep"), "--guidance", "1,4",
              "--count", "2", "--steps", "2", "--data", str(data)]
    with pytest.raises(SystemExit) as exit:
        main(common)
    assert exit.value.code == 2 and "--inception-weights" in capsys.readouterr().err
    main(common + ["--clip-model", "raphael-test-clip", "--clip-checkpoint", str(tiny_clip[2]),
                   "--inception-weights", "inception.safetensors"])
    sweep = json.loads((tmp_path / "sweep" / "guidance_sweep.json").read_text())
    assert sweep["prompts"] == 2 and sweep["reference"] == "real_images (2)"
    assert all("clip_score" in point and "alignment" not in point for point in sweep["points"])

"""The LoRA and ControlNet demonstrations (evaluation/extensions.py) run end to end on a tiny pipeline, and the
placement measure rewards shapes drawn where the scene's are."""

import json

import numpy as np
import torch

from raphael_ext import RaphaelPipeline
from raphael_ext.evaluation.extensions import controlnet_demonstration, lora_demonstration, placement
from raphael_ext.training.data import ShapesDataset


def test_placement_measures_where_shapes_are():
    item = ShapesDataset(4, 32, seed=5)[1]
    exact = ((item["image"] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert placement(exact, item["objects"], 32) == {"foreground_iou": 1.0, "object_iou": 1.0}
    empty = np.full_like(exact, 40)
    assert placement(empty, item["objects"], 32) == {"foreground_iou": 0.0, "object_iou": 0.0}
    shifted = np.roll(exact, 3, axis=1)  # objects are 7 to 12 px wide: a 3 px shift keeps part of each
    moved = placement(shifted, item["objects"], 32)
    assert 0.0 < moved["foreground_iou"] < 1.0


def test_demonstrations_run_on_a_tiny_pipeline(tmp_path):
    torch.manual_seed(0)
    RaphaelPipeline.from_preset("tiny", channels=(32, 64), norm_groups=8, edge_channels=8).save_pretrained(
        tmp_path / "base")
    lora = lora_demonstration(tmp_path / "base", tmp_path / "lora", steps=2, rank=2, count=2, sampling_steps=2,
                              data_size=8)
    assert set(lora) >= {"base/orange_prompts", "lora/orange_prompts", "base/usual_prompts", "lora/orange_found"}
    assert (tmp_path / "lora" / "lora_samples.png").is_file() and json.loads((tmp_path / "lora" / "lora.json").read_text())
    assert (tmp_path / "lora" / "data" / "00000.txt").read_text().startswith("an orange ")
    control = controlnet_demonstration(tmp_path / "base", tmp_path / "cn", steps=2, count=2, sampling_steps=2)
    assert set(control["scale_1"]) == {"alignment", "alignment_stderr", "foreground_iou", "object_iou"}
    assert (tmp_path / "cn" / "controlnet_samples.png").is_file()


def test_module_ablation_runs_and_aggregates_over_seeds(tmp_path, monkeypatch):
    import raphael_ext.evaluation.quality as quality
    from raphael_ext.evaluation.demo import module_ablation

    net = quality.shapes_feature_net(tmp_path / "features", steps=5)
    monkeypatch.setattr(quality, "shapes_feature_net", lambda cache_dir=None, **kwargs: net)
    report = module_ablation(tmp_path / "ablation", steps=2, seeds=(0, 1), variants=("full", "no_edge"),
                             guidances=(2.0, 5.0), count=2)
    assert set(report["variants"]) == {"full", "no_edge"} and len(report["variants"]["full"]) == 2
    point = report["variants"]["no_edge"][1]
    assert point["guidance"] == 5.0 and point["alignment_stderr"] >= 0 and point["fid_stderr"] >= 0
    runs = json.loads((tmp_path / "ablation" / "runs.json").read_text())
    assert [(r["variant"], r["seed"]) for r in runs] == [("full", 0), ("full", 1), ("no_edge", 0), ("no_edge", 1)]
    assert (tmp_path / "ablation" / "modules.png").is_file()

"""ShapesDataset: deterministic scenes, captions that match the geometry, masks and edges that match the pixels."""

import numpy as np
import pytest
import torch

from raphael_ext.training.data import COLORS, FolderDataset, ShapeSpec, ShapesDataset, pixels_to_unit_range, relation


def test_items_are_deterministic_and_seed_dependent():
    a, b = ShapesDataset(100, 32, seed=3), ShapesDataset(100, 32, seed=3)
    for i in (0, 7, 99):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and torch.equal(x["image"], y["image"])
    other = ShapesDataset(100, 32, seed=4)
    assert any(a[i]["caption"] != other[i]["caption"] for i in range(10))
    with pytest.raises(IndexError):
        a[100]


@pytest.mark.parametrize("size", [(32, 32), (24, 40), (64, 48)])
def test_masks_and_edges_match_the_render(size):
    data = ShapesDataset(50, size, seed=1)
    for i in range(50):
        item = data[i]
        objects, image, masks = item["objects"], item["image"], item["masks"].bool()
        assert image.shape == (3, *size) and masks.shape == (3, *size) and item["edges"].shape == (1, *size)
        pixels = ((image + 1) * 127.5).round().to(torch.uint8)
        for k, obj in enumerate(objects):
            assert masks[k].any(), "every object is visible"
            color = torch.tensor(COLORS[obj.color], dtype=torch.uint8)[:, None]
            assert torch.all(pixels[:, masks[k]] == color)
        assert not masks[len(objects):].any()
        assert not (masks.sum(0) > 1).any(), "objects never overlap"
        # edges: exactly the pixels with a 4-neighbour in another region
        region = torch.full(size, -1)
        for k in range(len(objects)):
            region[masks[k]] = k
        edges = torch.zeros(size, dtype=torch.bool)
        edges[:, 1:] |= region[:, 1:] != region[:, :-1]
        edges[:, :-1] |= region[:, :-1] != region[:, 1:]
        edges[1:] |= region[1:] != region[:-1]
        edges[:-1] |= region[:-1] != region[1:]
        assert torch.equal(item["edges"][0].bool(), edges)


def test_captions_follow_the_geometry():
    data = ShapesDataset(200, 32, seed=2)
    counts = set()
    for i in range(200):
        objects, text = data[i]["objects"], data[i]["caption"]
        counts.add(len(objects))
        assert all(f"a {o.color} {o.shape}" in text for o in objects)
        if len(objects) >= 2:
            assert relation(objects[0], objects[1]) in text
            dx, dy = objects[0].cx - objects[1].cx, objects[0].cy - objects[1].cy
            if "left" in text:
                assert dx < 0 and abs(dx) >= abs(dy)
            if "above" in text:
                assert dy < 0 and abs(dy) > abs(dx)
    assert counts == {1, 2, 3}


def test_bucket_sizes_render_the_same_scene():
    data = ShapesDataset(10, 32, seed=0)
    small, wide = data[(3, 32, 32)], data[(3, 32, 64)]
    assert small["caption"] == wide["caption"] and wide["image"].shape == (3, 32, 64)


def test_pixels_to_unit_range_is_torch_float32_arithmetic():
    """Every byte value, in a permuted (non-contiguous) batch as the loaders stack them: the bits of torch's
    x.float() / 127.5 - 1, 0 -> -1 and 255 -> 1."""
    pixels = torch.arange(256, dtype=torch.uint8).repeat(2, 3, 1).view(2, 3, 16, 16).permute(0, 1, 3, 2)
    out = pixels_to_unit_range(pixels)
    assert out.dtype == torch.float32 and out.shape == pixels.shape
    assert torch.equal(out, pixels.float() / 127.5 - 1.0)
    assert out.min() == -1 and out.max() == 1


def test_folder_dataset(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a grey picture\n")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "no_caption.png")
    data = FolderDataset(tmp_path, size=32)
    assert len(data) == 1
    item = data[0]
    assert item["caption"] == "a grey picture" and item["image"].shape == (3, 32, 32)
    assert torch.allclose(item["image"], torch.full((3, 32, 32), 200 / 127.5 - 1), atol=2 / 127.5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable image"):
        FolderDataset(tmp_path / "empty", size=8)


def test_judge_is_accurate_on_renders_and_rejects_wrong_scenes():
    from raphael_ext.evaluation.judge import judge_accuracy, judge_image

    data = ShapesDataset(300, 32, seed=11)
    assert judge_accuracy(data, 300) >= 0.95
    # The same judge scores mismatched image/prompt pairs low, so a high score means something.
    wrong = [judge_image(data[i]["image"], data[(i + 1) % 300]["objects"])["score"] for i in range(300)]
    assert np.mean(wrong) < 0.5
    blank = torch.full((3, 32, 32), -1.0)
    assert judge_image(blank, data[0]["objects"])["score"] == 0.0
    noise = [judge_image(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1,
                         data[i]["objects"])["score"] for i in range(50)]
    assert np.mean(noise) < 0.1, "uniform noise must not pass as shapes"


def test_judge_says_what_each_check_tests():
    from raphael_ext.evaluation.judge import judge_image

    data = ShapesDataset(60, 32, seed=12)
    for i in range(60):
        objects = data[i]["objects"]
        verdict = judge_image(data[i]["image"], objects)
        assert verdict["kinds"] == ["color", "shape"] * len(objects) + ["relation"] * (len(objects) >= 2)
        assert len(verdict["checks"]) == len(verdict["kinds"])
    single = next(data[i] for i in range(60) if len(data[i]["objects"]) == 1)
    drawn = single["objects"][0]
    asked = ShapeSpec(next(s for s in ("circle", "square", "triangle") if s != drawn.shape), drawn.color, drawn.cx,
                      drawn.cy, drawn.size)
    assert judge_image(single["image"], [asked])["checks"] == [True, False]  # the colour is there, not the shape

"""Visualisation grids: layout, palette colours, reproducible sampling, error messages."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from weakclip.data.masks import write_mask
from weakclip.errors import WeakclipError
from weakclip.visualize import make_grid, visualize_dirs

PERSON_RGB = (192, 128, 128)  # VOC palette colour of class 15 (person)
AEROPLANE_RGB = (128, 0, 0)  # class 1


def test_grid_layout_for_a_tall_image():
    image = np.zeros((400, 500, 3), np.uint8)
    masks = [np.zeros((400, 500), np.uint8), None]
    grid = make_grid(image, masks, ["img", "gt", "missing"])
    # scaled to 320 px tall -> 400 px wide panels; 3 panels + 2 gaps of 4 px; 16 px title strip
    assert grid.size == (3 * 400 + 2 * 4, 16 + 320)
    assert grid.mode == "RGB"


def test_small_image_is_not_enlarged():
    grid = make_grid(np.zeros((50, 60, 3), np.uint8), [np.zeros((50, 60), np.uint8)], ["a", "b"])
    assert grid.size == (2 * 60 + 4, 16 + 50)


def test_mask_colours_follow_the_voc_palette():
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = 15
    mask[30:, :20] = 1
    grid = np.array(make_grid(np.zeros((40, 40, 3), np.uint8), [mask], ["image", "mask"]))
    x0, y0 = 40 + 4, 16  # second panel's top-left corner
    assert tuple(grid[y0 + 10, x0 + 30]) == PERSON_RGB
    assert tuple(grid[y0 + 35, x0 + 5]) == AEROPLANE_RGB
    assert tuple(grid[y0 + 10, x0 + 5]) == (0, 0, 0)  # background


def test_title_count_must_match_panels():
    with pytest.raises(ValueError, match="titles"):
        make_grid(np.zeros((4, 4, 3), np.uint8), [np.zeros((4, 4), np.uint8)], ["only one"])


def test_random_sample_is_reproducible(voc_sample, tmp_path):
    args = (voc_sample / "JPEGImages", [voc_sample / "SegmentationClass", voc_sample / "Seeds"])
    first = visualize_dirs(*args, tmp_path / "a", num=2, seed=3)
    again = visualize_dirs(*args, tmp_path / "b", num=2, seed=3)
    assert len(first) == 2
    assert [p.name for p in first] == [p.name for p in again]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [p.name for p in first]  # nothing else
    # seed changes the draw (two fixed seeds known to differ on the 200 ids; guards against ignoring seed)
    other = {p.name for p in visualize_dirs(*args, tmp_path / "c", num=2, seed=4)}
    assert other != {p.name for p in first}
    with Image.open(first[0]) as grid, Image.open(voc_sample / "JPEGImages" / f"{first[0].stem}.jpg") as image:
        assert grid.height == 16 + min(image.height, 320)


def test_listed_ids_and_default_titles(voc_sample, tmp_path):
    paths = visualize_dirs(voc_sample / "JPEGImages", [voc_sample / "Seeds"], tmp_path,
                           ids=["2007_000033", "2007_000032"])
    assert [p.name for p in paths] == ["2007_000032.png", "2007_000033.png"]
    with Image.open(paths[0]) as im:  # 2007_000032 is 500x281: not scaled
        assert im.size == (2 * 500 + 4, 16 + 281)


def test_missing_mask_names_the_file(voc_sample, tmp_path):
    masks = tmp_path / "masks"
    write_mask(masks / "2007_000032.png", np.zeros((281, 500), np.uint8))
    with pytest.raises(WeakclipError, match=r"masks/2007_000033\.png"):
        visualize_dirs(voc_sample / "JPEGImages", [masks], tmp_path / "out", ids=["2007_000032", "2007_000033"])


def test_missing_image_and_wrong_mask_size_name_the_file(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    write_mask(masks / "x.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(WeakclipError, match=r"images/x\.jpg"):
        visualize_dirs(images, [masks], tmp_path / "out")
    Image.new("RGB", (10, 8)).save(images / "x.png")  # .png images are accepted too
    with pytest.raises(WeakclipError, match=r"masks/x\.png.*8x8.*10x8"):
        visualize_dirs(images, [masks], tmp_path / "out")

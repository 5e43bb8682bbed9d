"""The HTML report: per-image scores against hand-written references, bad input named and counted, the
protocol card in evaluate's JSON, and the page itself driven in headless Chromium (selenium)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakclip.cli import main
from weakclip.config import VOC_CLASSES, load_config
from weakclip.data.masks import read_mask, write_mask
from weakclip.report import build_report

K = len(VOC_CLASSES)
CAT, DOG = VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")


# ----------------------------------------------------------------------------- independent references


def ref_class_iou(pred: np.ndarray, gt: np.ndarray) -> dict[int, tuple[int, int]]:
    """class -> (intersection, union) over pixels whose ground truth is not 255 (pred 255 is a miss)."""
    valid = gt != 255
    out = {}
    for c in range(K):
        g, p = (gt == c) & valid, (pred == c) & valid
        union = int((g | p).sum())
        if union:
            out[c] = (int((g & p).sum()), union)
    return out


def ref_miou(pred: np.ndarray, gt: np.ndarray) -> float:
    return 100.0 * float(np.mean([i / u for i, u in ref_class_iou(pred, gt).values()]))


def perturb(gt: np.ndarray, n: int) -> np.ndarray:
    """A deterministic stand-in for a pseudo mask: the ground truth shifted right by 3n % 40 pixels, with
    the first rows unsure (255) for every third image."""
    pred = np.roll(gt, 3 * n % 40, axis=1)
    if n % 3 == 0:
        pred[: 5 + n % 20] = 255
    return pred


# ----------------------------------------------------------------------------------------- browser


def _browser_paths() -> tuple[str, str] | None:
    names = ("chromium", "chromium-browser", "google-chrome")
    binary = next((p for n in names if (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through selenium, with the page's console log readable (goog:loggingPrefs)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        reason = 'selenium is not installed (pip install "weakclip[test]")'
        paths = None
    else:
        paths = _browser_paths()
        reason = "no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)"
    if paths is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must run the browser tests")
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(paths[1]))
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


def open_page(driver, index: Path) -> None:
    driver.get(index.resolve().as_uri())
    driver.get_log("browser")  # start each page with an empty log


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "ERROR")]


def shown_ids(driver) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll('#rows tr')].map(r => r.dataset.id)")


def shown_scores(driver, key: str) -> list[float | None]:
    texts = driver.execute_script(
        f"return [...document.querySelectorAll('#rows td[data-score=\"{key}\"]')].map(td => td.textContent)")
    return [None if t == "-" else float(t) for t in texts]


def select(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", element_id)).select_by_value(value)


# ----------------------------------------------------------------------------- the real sample


@pytest.fixture(scope="module")
def sample_report(voc_sample, tmp_path_factory):
    """The report of the real sample: its 200 images, seeds, ground truth and perturbed-GT pseudo masks."""
    tmp = tmp_path_factory.mktemp("sample-report")
    ids = (voc_sample / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    maps = {}
    for n, i in enumerate(ids):
        gt = read_mask(voc_sample / "SegmentationClass" / f"{i}.png")
        pred = perturb(gt, n)
        write_mask(tmp / "pred" / f"{i}.png", pred)
        maps[i] = (pred, read_mask(voc_sample / "Seeds" / f"{i}.png"), gt)
    listing = voc_sample / "ImageSets" / "Segmentation" / "train.txt"
    summary = build_report(voc_sample / "JPEGImages", tmp / "pred", tmp / "report", VOC_CLASSES,
                           seeds_dir=voc_sample / "Seeds", gt_dir=voc_sample / "SegmentationClass",
                           ids=ids, card={"command": "test"}, progress=False)
    data = json.loads((tmp / "report" / "report.json").read_text())
    return {"summary": summary, "data": data, "ids": ids, "maps": maps, "dir": tmp / "report", "list": listing}


def test_sample_scores_match_hand_computed_references(sample_report):
    data, maps = sample_report["data"], sample_report["maps"]
    assert sample_report["summary"]["images"] == 200 and data["problems"] == {}
    assert [r["id"] for r in data["rows"]] == sample_report["ids"]
    totals = np.zeros((K, 2))
    for row in data["rows"]:
        pred, seeds, gt = maps[row["id"]]
        assert row["scores"]["pred_miou"] == pytest.approx(ref_miou(pred, gt), abs=1e-3)
        assert row["scores"]["seeds_miou"] == pytest.approx(ref_miou(seeds, gt), abs=1e-3)
        sure = seeds != 255
        assert row["scores"]["seed_agreement"] == pytest.approx(100 * (pred[sure] == seeds[sure]).mean(), abs=1e-3)
        assert row["scores"]["unsure"] == pytest.approx(100 * (pred == 255).mean(), abs=1e-3)
        per_class = ref_class_iou(pred, gt)
        assert {int(c): v for c, v in row["class_iou"].items()} == pytest.approx(
            {c: 100 * i / u for c, (i, u) in per_class.items()}, abs=1e-3)
        for c, (i, u) in per_class.items():
            totals[c] += (i, u)
        present = set(np.unique(np.concatenate([pred.ravel(), seeds.ravel(), gt.ravel()]))) - {255}
        assert row["classes"] == sorted(int(c) for c in present)
        for layer in ("image", "seeds", "pred", "gt"):  # every referenced file exists beside index.html
            paths = [row["image"], row["thumb"]] if layer == "image" else row["layers"][layer].values()
            for path in paths:
                assert (sample_report["dir"] / path).is_file()
    table = data["class_table"]
    expected = [100 * i / u for i, u in totals if u]
    assert table["miou"] == pytest.approx(np.mean(expected), abs=1e-3)
    assert table["classes"][CAT]["iou"] == pytest.approx(100 * totals[CAT][0] / totals[CAT][1], abs=1e-3)


def test_sample_report_in_chromium_rows_sort_filter_viewer(sample_report, browser):
    from selenium.webdriver.common.by import By

    maps, index = sample_report["maps"], sample_report["dir"] / "index.html"
    open_page(browser, index)
    assert browser.find_element(By.ID, "count").text == "200 of 200 images"
    select(browser, "page-size", "500")
    ids = shown_ids(browser)
    assert sorted(ids) == sorted(sample_report["ids"])  # one row per image

    # Default: worst pseudo-mask mIoU first.
    scores = shown_scores(browser, "pred_miou")
    assert scores == sorted(scores)
    worst = min(maps, key=lambda i: (ref_miou(maps[i][0], maps[i][2]), i))
    assert ids[0] == worst
    browser.find_element(By.ID, "order").click()
    assert shown_scores(browser, "pred_miou") == sorted(scores, reverse=True)
    select(browser, "sort", "id")
    assert shown_ids(browser) == sorted(sample_report["ids"])

    # Class filter: exactly the images with a cat in any of their maps.
    select(browser, "class-filter", str(CAT))
    with_cat = {i for i, m in maps.items() if any((x == CAT).any() for x in m)}
    assert set(shown_ids(browser)) == with_cat and len(shown_ids(browser)) == len(with_cat) > 0
    select(browser, "class-filter", "-1")
    text = browser.find_element(By.ID, "text-filter")
    text.send_keys(sample_report["ids"][7])
    assert shown_ids(browser) == [sample_report["ids"][7]]
    text.clear()
    text.send_keys("x")  # an input event resets the filter on the next keystroke
    browser.execute_script("const t = document.getElementById('text-filter'); t.value = '';"
                           "t.dispatchEvent(new Event('input'))")
    assert len(shown_ids(browser)) == 200

    # A class of the per-class table links to its worst images: that class's IoU, lowest first.
    browser.find_element(By.CSS_SELECTOR, f'a.worst[data-class="{DOG}"]').click()
    ids = shown_ids(browser)
    with_dog = {i for i, m in maps.items() if any((x == DOG).any() for x in m)}
    assert set(ids) == with_dog
    dog_iou = shown_scores(browser, f"iou:{DOG}")
    assert [x for x in dog_iou if x is not None] == sorted(x for x in dog_iou if x is not None)

    # Full-size view: the image itself, the chosen overlay, the toggle and the opacity.
    first = ids[0]
    browser.find_element(By.CSS_SELECTOR, f'#rows tr[data-id="{first}"] .stack[data-layer="pred"]').click()
    viewer = browser.find_element(By.ID, "viewer")
    assert viewer.is_displayed()
    image = browser.find_element(By.ID, "full-image")
    overlay = browser.find_element(By.ID, "full-overlay")
    assert image.get_attribute("src").endswith(f"images/{first}.jpg")
    assert overlay.get_attribute("src").endswith(f"full/pred/{first}.png")
    browser.execute_script("return new Promise(r => { const i = document.getElementById('full-image');"
                           " i.complete ? r() : i.onload = r; })")
    h, w = maps[first][2].shape
    assert browser.execute_script("return document.getElementById('full-image').naturalWidth") == w
    assert overlay.is_displayed()
    browser.find_element(By.ID, "overlay-on").click()
    assert not overlay.is_displayed()
    browser.find_element(By.ID, "overlay-on").click()
    browser.execute_script("const o = document.getElementById('opacity'); o.value = 25;"
                           "o.dispatchEvent(new Event('input'))")
    assert float(overlay.value_of_css_property("opacity")) == pytest.approx(0.25)
    browser.find_element(By.ID, "close").click()
    assert not viewer.is_displayed()
    assert console_errors(browser) == []


def test_ten_thousand_rows_are_paged(tmp_path, browser):
    # Page-only data (no image files): the script renders one page of rows at a time.
    from weakclip.report.page import render_page

    n = 10_000
    rows = [{"id": f"img{i:05d}", "image": None, "thumb": None, "layers": {}, "classes": [0, 1 + i % 20],
             "scores": {"pred_miou": (i * 7919) % n / 10}, "class_iou": {}, "problems": [], "size": None}
            for i in range(n)]
    data = {"classes": list(VOC_CLASSES), "colors": ["#000000"] * K, "ignore_color": "#e0e0c0", "ignore_index": 255,
            "layers": [{"key": "pred", "title": "pseudo masks", "folder": "-"}], "images_dir": "-", "problems": {},
            "class_table": None, "card": None, "rows": rows}
    (tmp_path / "index.html").write_text(render_page(data))
    open_page(browser, tmp_path / "index.html")
    assert browser.find_element("id", "count").text == f"{n} of {n} images"
    assert browser.find_element("id", "page").text == "page 1 of 200"
    assert shown_scores(browser, "pred_miou") == [i / 10 for i in range(50)]  # 7919 is prime: a permutation
    browser.find_element("id", "next").click()
    assert shown_scores(browser, "pred_miou") == [i / 10 for i in range(50, 100)]
    select(browser, "class-filter", str(CAT))
    assert browser.find_element("id", "count").text == f"{n // 20} of {n} images"
    assert len(shown_ids(browser)) == 50 and browser.find_element("id", "page").text == "page 1 of 10"
    assert console_errors(browser) == []


# ----------------------------------------------------------------------------------------- bad input


def _tiny_dataset(root: Path) -> list[str]:
    """Five 40x30 images; ground truth: left half background, right half cat; pseudo masks with faults."""
    ids = ["a_ok", "b_size", "c_missing", "d_unknown", "e_noimage"]
    gt = np.zeros((30, 40), np.uint8)
    gt[:, 20:] = CAT
    rng = np.random.default_rng(0)
    for i in ids:
        if i != "e_noimage":
            Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(root / "img" / f"{i}.jpg")
        write_mask(root / "gt" / f"{i}.png", gt)
        pred = gt.copy()
        if i == "b_size":
            pred = np.zeros((20, 40), np.uint8)
        if i == "d_unknown":
            pred[:, 30:] = 30  # the right-most 10 columns: an index beyond VOC's 21 classes
        if i != "c_missing":
            write_mask(root / "pred" / f"{i}.png", pred)
    cams = np.zeros((1, 15, 20), np.float16)
    cams[0, :, 10:] = 1.0
    with open(root / "cams" / "a_ok.npz", "wb") as f:
        np.savez_compressed(f, cams=cams, classes=np.array([CAT]))
    (root / "list.txt").write_text("\n".join(ids) + "\n")
    return ids


@pytest.fixture
def tiny(tmp_path):
    for sub in ("img", "gt", "pred", "cams", "seeds"):
        (tmp_path / sub).mkdir()
    return tmp_path, _tiny_dataset(tmp_path)


def test_bad_input_is_named_and_counted_not_fatal(tiny, browser):
    root, ids = tiny
    summary = build_report(root / "img", root / "pred", root / "out", VOC_CLASSES, gt_dir=root / "gt",
                           cams_dir=root / "cams", ids=ids, progress=False)
    assert summary["images"] == 5
    # missing: c's prediction, e's image, the CAMs of all but a (4); size: b; unknown class: d
    assert summary["problems"] == {"missing": 2 + 4, "size": 1, "unknown_class": 1}
    rows = {r["id"]: r for r in json.loads((root / "out" / "report.json").read_text())["rows"]}
    texts = {i: " | ".join(p["text"] for p in r["problems"]) for i, r in rows.items()}
    assert str(root / "pred" / "b_size.png") in texts["b_size"] and "40x20" in texts["b_size"]
    assert str(root / "pred" / "c_missing.png") in texts["c_missing"]
    assert str(root / "pred" / "d_unknown.png") in texts["d_unknown"] and "unknown class index 30" in texts["d_unknown"]
    assert "image missing" in texts["e_noimage"]
    assert "pred" not in rows["b_size"]["layers"] and "pred_miou" not in rows["b_size"]["scores"]
    assert rows["a_ok"]["scores"]["pred_miou"] == 100.0
    # d: background IoU 1; cat: 10 of its 20 columns predicted 30 (a miss) -> IoU 0.5; mIoU 75
    assert rows["d_unknown"]["scores"]["pred_miou"] == pytest.approx(75.0)
    assert rows["e_noimage"]["scores"]["pred_miou"] == 100.0 and rows["e_noimage"]["image"] is None
    with Image.open(root / "out" / rows["a_ok"]["layers"]["cams"]["full"]) as cam:
        assert cam.size == (40, 30)  # CAMs are resized to their image for the overlay
        assert np.array(cam)[5, 5] == 0 and np.array(cam)[5, 35] == 255
    assert not list(root.glob(".out.*"))  # no staging folder left

    open_page(browser, root / "out" / "index.html")
    page = browser.find_element("tag name", "body").text
    assert "weakclip report: 5 images, 8 problems" in page
    assert "unknown_class: 1" in page and "size: 1" in page
    assert len(shown_ids(browser)) == 5
    assert "unknown class index 30" in browser.find_element("css selector", '#rows tr[data-id="d_unknown"]').text
    assert console_errors(browser) == []


def test_without_ground_truth_scores_against_the_seeds(tiny):
    root, _ = tiny
    seeds = np.zeros((30, 40), np.uint8)
    seeds[:, 20:] = CAT
    seeds[:, 18:22] = 255  # unsure band: not counted in the agreement
    write_mask(root / "seeds" / "a_ok.png", seeds)
    pred = seeds.copy()
    pred[:, 18:22] = CAT
    pred[:, 30:] = 0  # 10 of the seeds' 18 sure cat columns lost
    pred[:3] = 255  # 3 of 30 rows unsure
    write_mask(root / "pred" / "a_ok.png", pred)
    build_report(root / "img", root / "pred", root / "out", VOC_CLASSES, seeds_dir=root / "seeds", ids=["a_ok"],
                 progress=False)
    data = json.loads((root / "out" / "report.json").read_text())
    scores = data["rows"][0]["scores"]
    assert "pred_miou" not in scores and data["class_table"]["reference"] == "seeds"
    sure = 30 * 36  # pixels outside the band
    agree = 27 * 36 - 27 * 10  # sure pixels of the rows not set to 255, minus the lost cat columns
    assert scores["seed_agreement"] == pytest.approx(100 * agree / sure, abs=1e-3)
    assert scores["unsure"] == pytest.approx(10.0)
    # against the seeds, their 255 band left out: background 30 x 18 in the seeds, predicted on 27 rows of
    # its 18 columns plus the 10 lost ones; cat 30 x 18 in the seeds, predicted on 27 rows of 8 columns
    bkg_i, bkg_u = 27 * 18, 30 * 18 + 27 * 10
    cat_i, cat_u = 27 * 8, 30 * 18
    assert scores["pred_vs_seeds_miou"] == pytest.approx(50 * (bkg_i / bkg_u + cat_i / cat_u), abs=1e-3)

    seeds[0, 0] = 77  # an unknown class in the seeds standing in for the ground truth: named, never a crash
    write_mask(root / "seeds" / "a_ok.png", seeds)
    summary = build_report(root / "img", root / "pred", root / "out", VOC_CLASSES, seeds_dir=root / "seeds",
                           ids=["a_ok"], progress=False)
    assert summary["problems"] == {"unknown_class": 1}
    scores = json.loads((root / "out" / "report.json").read_text())["rows"][0]["scores"]
    assert "pred_vs_seeds_miou" not in scores and scores["seed_agreement"] < 100


def test_unknown_class_in_ground_truth_leaves_the_image_unscored(tiny):
    root, _ = tiny
    gt = read_mask(root / "gt" / "a_ok.png")
    gt[0, 0] = 99
    write_mask(root / "gt" / "a_ok.png", gt)
    summary = build_report(root / "img", root / "pred", root / "out", VOC_CLASSES, gt_dir=root / "gt",
                           ids=["a_ok"], progress=False)
    row = json.loads((root / "out" / "report.json").read_text())["rows"][0]
    assert summary["problems"] == {"unknown_class": 1}
    assert "unknown class index 99" in row["problems"][0]["text"] and "left unscored" in row["problems"][0]["text"]
    assert "pred_miou" not in row["scores"] and "gt" in row["layers"]


def test_without_an_image_the_first_label_map_sets_the_size(tiny):
    root, _ = tiny
    write_mask(root / "gt" / "e_noimage.png", np.zeros((10, 20), np.uint8))
    (root / "cams" / "e_noimage.npz").write_bytes(b"not a zip archive")
    summary = build_report(root / "img", root / "pred", root / "out", VOC_CLASSES, gt_dir=root / "gt",
                           cams_dir=root / "cams", ids=["e_noimage"], progress=False)
    assert summary["problems"] == {"missing": 1, "size": 1, "unreadable": 1}
    row = json.loads((root / "out" / "report.json").read_text())["rows"][0]
    texts = " | ".join(p["text"] for p in row["problems"])
    assert f"{root / 'gt' / 'e_noimage.png'}: ground truth is 20x10 (WxH) but the first label map is 40x30" in texts
    assert str(root / "cams" / "e_noimage.npz") in texts
    assert row["size"] == [40, 30] and set(row["layers"]) == {"pred"} and row["scores"] == {"unsure": 0.0}


def test_evaluate_json_records_the_protocol_card_and_writes_the_report(tiny, capsys):
    root, ids = tiny
    (root / "pred" / "b_size.png").unlink()
    write_mask(root / "pred" / "b_size.png", read_mask(root / "gt" / "b_size.png"))
    write_mask(root / "pred" / "c_missing.png", read_mask(root / "gt" / "c_missing.png"))
    (root / "pred" / "manifest.json").write_text(json.dumps({
        "checkpoint_sha256": "ab" * 32, "refiner": {"clip_weights": "sha256 " + "cd" * 32},
        "infer": {"scales": [0.5, 1.0], "flip": False, "crf": False, "label_filter": True}}))
    argv = ["evaluate", "--pred", str(root / "pred"), "--gt", str(root / "gt"), "--config", "voc-sample-cpu",
            "--set", f"data.root={root}", "--set", "data.images_dir=img", "--list", str(root / "list.txt"),
            "--json", str(root / "eval.json"), "--report", str(root / "report")]
    assert main(argv) == 0
    card = json.loads((root / "eval.json").read_text())["protocol"]
    assert card["command"].startswith("weakclip evaluate --pred ")
    assert card["config"]["name"] == "voc-sample-cpu" and card["config"]["overrides"] == [f"data.root={root}", "data.images_dir=img"]
    assert card["checkpoint"] == {"sha256": "ab" * 32}
    assert card["clip"]["weights"] == "sha256 " + "cd" * 32
    assert (card["scales"], card["flip"], card["crf"], card["label_filter"]) == ([0.5, 1.0], False, None, True)
    assert card["list"]["images"] == 5 and card["weakclip_version"]
    assert card["source"].endswith("manifest.json")
    report = json.loads((root / "report" / "report.json").read_text())
    assert report["card"]["checkpoint"] == card["checkpoint"] and len(report["rows"]) == 5
    assert report["problems"] == {"missing": 1, "unknown_class": 1}  # e's image; d's class 30
    assert (root / "report" / "index.html").is_file()
    assert main(argv) == 0  # a second run replaces the report whole
    assert not list(root.glob(".report.*"))


def test_report_command_bad_folder_is_one_line_and_writes_nothing(tiny, capsys):
    root, _ = tiny
    code = main(["report", "--images", str(root / "nope"), "--pred", str(root / "pred"), "--config", "voc",
                 "--output", str(root / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"weakclip: error: {root / 'nope'}: folder not found"
    assert not (root / "out").exists()
    code = main(["evaluate", "--pred", str(root / "gt"), "--gt", str(root / "gt"), "--config", "voc",
                 "--json", str(root / "eval.json"), "--report", str(root / "out")])
    err = capsys.readouterr().err.strip()
    images = Path(load_config("voc").data.root) / "JPEGImages"
    assert code == 2 and err == f"weakclip: error: {images}: image folder for --report not found (give --images)"
    assert not (root / "eval.json").exists() and not (root / "out").exists()


def test_an_output_folder_that_is_not_a_report_is_refused_and_kept(tiny, capsys):
    root, _ = tiny
    out = root / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["report", "--images", str(root / "img"), "--pred", str(root / "pred"), "--config", "voc",
            "--output", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"weakclip: error: {out}: exists and is not a weakclip report (no report.json of one); "
                   f"nothing was changed: choose a new or empty --output folder")
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    # An earlier report there is replaced.
    (out / "notes.txt").unlink()
    assert main(args) == 0 and main(args) == 0
    assert (out / "index.html").is_file() and not list(root.glob(".mine.*"))


def test_card_falls_back_to_the_config_and_knows_retrained_segmenters(tmp_path):
    from weakclip.report import protocol_card

    cfg = load_config("voc-sample-cpu", ["infer.flip=false"])
    card = protocol_card(cfg, "voc-sample-cpu", ["infer.flip=false"], pred_dir=tmp_path, command=["report"])
    assert card["source"] == "config" and card["checkpoint"] is None and card["command"] == "weakclip report"
    assert card["clip"]["weights"].startswith("random init") and card["flip"] is False
    assert card["scales"] == cfg.infer.scales and card["crf"]["bilateral_srgb"] == cfg.infer.crf_params.bilateral_srgb
    (tmp_path / "manifest.json").write_text(json.dumps({"checkpoint_sha256": "ef" * 32, "refiner": None}))
    card = protocol_card(cfg, "voc-sample-cpu", pred_dir=tmp_path, command=["report"])
    assert card["clip"]["weights"].startswith("none") and card["checkpoint"] == {"sha256": "ef" * 32}

"""Build the HTML report's folder: per-image scores, thumbnails and full-size overlays, per-class tables.

Layout of the output folder (everything relative, so it opens from a copy or a file share)::

    index.html               the page (scripts, styles and the per-image data inline)
    report.json              the same data: rows, per-class table, confusion, problems, protocol card
    images/<id>.<ext>        the images, copied
    full/<layer>/<id>.png    each label map in the dataset's palette, full size, background (0) transparent
    thumbs/<layer>/<id>.*    thumbnails (longest side THUMB_SIZE) of the image and of each label map

Bad input never stops the build: a missing or unreadable file, a label map whose size differs from its
image, a class index outside 0..K-1 that is not the ignore index are each named in the report (and counted
by kind); a label map of the wrong size is left unscored and unshown, an unknown class index is shown and
scored as a miss (see :mod:`weakclip.metrics`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.datasets import folder_image
from ..data.masks import read_mask, voc_palette
from ..errors import WeakclipError
from ..fileio import visible_files
from ..metrics import ConfusionMeter
from .page import render_page

THUMB_SIZE = 160  # longest side of a thumbnail, in pixels
_PALETTE = voc_palette().reshape(-1).tolist()


@dataclass(frozen=True)
class Layer:
    """One folder of per-image maps: ``key`` names it in the data and the file tree, ``title`` on the page."""

    key: str
    title: str
    folder: Path
    suffix: str = ".png"


def _heat_palette() -> list[int]:
    """A 256-entry dark-blue -> red -> yellow palette for CAMs (index = CAM value * 255)."""
    t = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([np.clip(2 * t, 0, 1), np.clip(2 * t - 1, 0, 1), np.clip(0.5 - t, 0, 1) * 2], axis=1)
    return (rgb * 255).round().astype(np.uint8).reshape(-1).tolist()


_HEAT = _heat_palette()


def _save_paletted(index: np.ndarray, palette: list[int], full: Path, thumb: Path, size: tuple[int, int],
                   transparent: int | None = None) -> None:
    """(H, W) uint8 palette indices -> ``full`` (as is) and ``thumb`` (nearest-resized to ``size``, PIL's
    (width, height)), both palette PNGs; index ``transparent`` (background) is see-through in overlays."""
    im = Image.fromarray(index, "P")
    im.putpalette(palette)
    extra = {} if transparent is None else {"transparency": transparent}
    im.save(full, format="PNG", compress_level=1, **extra)
    im.resize(size, Image.Resampling.NEAREST).save(thumb, format="PNG", compress_level=1, **extra)


def _thumb_size(w: int, h: int) -> tuple[int, int]:
    scale = min(1.0, THUMB_SIZE / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def _pct(num: float, den: float) -> float | None:
    return None if den == 0 else 100.0 * num / den


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 3)


class _Builder:
    """Per-image work (files + scores) and the running totals of one report."""

    def __init__(self, out: Path, images_dir: Path, layers: Sequence[Layer], class_names: Sequence[str],
                 ignore_index: int) -> None:
        self.out, self.images_dir, self.layers = out, images_dir, list(layers)
        self.names, self.k, self.ignore = list(class_names), len(class_names), ignore_index
        self.keys = {layer.key for layer in layers}
        self.reference = "gt" if "gt" in self.keys else ("seeds" if "seeds" in self.keys else None)
        self.pred_meter = ConfusionMeter(self.k, ignore_index)
        self.seeds_meter = ConfusionMeter(self.k, ignore_index)
        self.problems: Counter = Counter()
        for sub in ("images", "thumbs/image", *(f"full/{x.key}" for x in layers), *(f"thumbs/{x.key}" for x in layers)):
            (out / sub).mkdir(parents=True, exist_ok=True)

    def _problem(self, row: dict, kind: str, text: str) -> None:
        self.problems[kind] += 1
        row["problems"].append({"kind": kind, "text": text})

    def _image(self, row: dict, image_id: str) -> tuple[int, int] | None:
        """Copy the image, write its thumbnail; its (width, height), or None when missing or unreadable."""
        path = folder_image(self.images_dir, image_id)
        if not path.is_file():
            self._problem(row, "missing", f"{path}: image missing")
            return None
        try:
            with Image.open(path) as im:
                size = im.size
                im.draft("RGB", _thumb_size(*size))  # JPEG: decode at a reduced scale, much faster
                thumb = im.convert("RGB")
                thumb.thumbnail(_thumb_size(*size), Image.Resampling.BILINEAR)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            self._problem(row, "unreadable", f"{path}: cannot read image ({exc})")
            return None
        thumb.save(self.out / "thumbs" / "image" / f"{image_id}.jpg", format="JPEG", quality=80)
        shutil.copyfile(path, self.out / "images" / path.name)
        row["image"] = f"images/{path.name}"
        row["thumb"] = f"thumbs/image/{image_id}.jpg"
        return size

    def _read(self, row: dict, layer: Layer, image_id: str, size: tuple[int, int] | None) -> np.ndarray | None:
        """One label map (H, W) uint8, or None (missing, unreadable, wrong size: each recorded)."""
        path = layer.folder / f"{image_id}{layer.suffix}"
        if not path.is_file():
            self._problem(row, "missing", f"{path}: {layer.title} missing")
            return None
        try:
            if layer.key == "cams":
                with np.load(path) as z:
                    cams = z["cams"].astype(np.float32)
                    row["cam_classes"] = [int(c) for c in z["classes"]]
                return cams
            mask = read_mask(path)
        except (WeakclipError, OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            self._problem(row, "unreadable", f"{path}: {exc}" if not str(exc).startswith(str(path)) else str(exc))
            return None
        if size is not None and (mask.shape[1], mask.shape[0]) != size:
            of = "the image" if row["image"] else "the first label map"
            self._problem(row, "size", f"{path}: {layer.title} is {mask.shape[1]}x{mask.shape[0]} (WxH) but {of} "
                                       f"is {size[0]}x{size[1]}; not shown, not scored")
            return None
        bad = np.unique(mask[(mask >= self.k) & (mask != self.ignore)])
        if bad.size:
            what = "the image is left unscored" if layer.key == self.reference else "scored as a miss"
            self._problem(row, "unknown_class", f"{path}: unknown class index {', '.join(map(str, bad[:5].tolist()))}"
                                                f" (classes are 0..{self.k - 1}, {self.ignore} = ignore); {what}")
        return mask

    def _write_cams(self, image_id: str, cams: np.ndarray, size: tuple[int, int] | None) -> dict:
        """Max over the image's classes, 0..1 -> heat palette PNGs (resized to the image for the full view)."""
        peak = cams.max(axis=0) if cams.ndim == 3 and len(cams) else np.zeros(cams.shape[-2:], np.float32)
        heat = Image.fromarray((np.clip(peak, 0.0, 1.0) * 255).round().astype(np.uint8), "L")
        if size is not None and heat.size != size:
            heat = heat.resize(size, Image.Resampling.BILINEAR)
        index = np.asarray(heat)
        _save_paletted(index, _HEAT, self.out / "full" / "cams" / f"{image_id}.png",
                       self.out / "thumbs" / "cams" / f"{image_id}.png", _thumb_size(*heat.size))
        return {"full": f"full/cams/{image_id}.png", "thumb": f"thumbs/cams/{image_id}.png"}

    def _score(self, row: dict, maps: dict[str, np.ndarray]) -> None:
        scores, pred, seeds, gt = row["scores"], maps.get("pred"), maps.get("seeds"), maps.get("gt")
        if gt is not None and ((gt >= self.k) & (gt != self.ignore)).any():
            gt = None  # named as a problem; scoring against it would be meaningless
        ref = gt if gt is not None else (seeds if self.reference == "seeds" else None)
        if ref is seeds and seeds is not None and ((seeds >= self.k) & (seeds != self.ignore)).any():
            ref = None  # the same for seeds standing in for the ground truth
        if pred is not None:
            scores["unsure"] = _json_float(_pct(int((pred == self.ignore).sum()), pred.size))
            if ref is not None:
                meter = ConfusionMeter(self.k, self.ignore)
                meter.update(pred, ref)
                self.pred_meter.add(meter)
                result = meter.result(self.names)
                scores["pred_miou" if gt is not None else "pred_vs_seeds_miou"] = _json_float(result.miou)
                row["class_iou"] = {str(c): _json_float(s["iou"]) for c, s in enumerate(result.per_class.values())
                                    if not math.isnan(s["iou"])}
            if seeds is not None:
                sure = seeds != self.ignore
                scores["seed_agreement"] = _json_float(_pct(int((pred[sure] == seeds[sure]).sum()), int(sure.sum())))
        if seeds is not None and gt is not None:
            meter = ConfusionMeter(self.k, self.ignore)
            meter.update(seeds, gt)
            self.seeds_meter.add(meter)
            scores["seeds_miou"] = _json_float(meter.result(self.names).miou)

    def image(self, image_id: str) -> dict:
        """Everything about one image: files written, its row of the page returned."""
        row: dict = {"id": image_id, "image": None, "thumb": None, "layers": {}, "classes": [], "scores": {},
                     "class_iou": {}, "problems": []}
        size = self._image(row, image_id)
        maps: dict[str, np.ndarray] = {}
        for layer in self.layers:
            data = self._read(row, layer, image_id, size)
            if data is None:
                continue
            if layer.key == "cams":
                row["layers"]["cams"] = self._write_cams(image_id, data, size)
                continue
            maps[layer.key] = data
            if size is None:  # no image: the first label map sets the size the others must have
                size = (data.shape[1], data.shape[0])
            thumb_size = _thumb_size(data.shape[1], data.shape[0])
            _save_paletted(data, _PALETTE, self.out / "full" / layer.key / f"{image_id}.png",
                           self.out / "thumbs" / layer.key / f"{image_id}.png", thumb_size, transparent=0)
            row["layers"][layer.key] = {"full": f"full/{layer.key}/{image_id}.png",
                                        "thumb": f"thumbs/{layer.key}/{image_id}.png"}
        present = set(row.pop("cam_classes", []))
        for mask in maps.values():
            present.update(int(c) for c in np.unique(mask) if c < self.k)
        row["classes"] = sorted(present)
        row["size"] = list(size) if size else None
        self._score(row, maps)
        return row

    def class_table(self) -> dict | None:
        """Per-class IoU / precision / recall of the pseudo masks (and seeds' IoU) against the reference."""
        if self.reference is None or self.pred_meter.num_images == 0:
            return None
        result = self.pred_meter.result(self.names)
        seeds = self.seeds_meter.result(self.names) if self.seeds_meter.num_images else None
        counts = np.concatenate([result.confusion, result.unassigned[:, None]], axis=1)
        return {
            "reference": self.reference,
            "miou": _json_float(result.miou),
            "seeds_miou": _json_float(seeds.miou) if seeds else None,
            "classes": [
                {"index": c, "name": name, **{key: _json_float(v) for key, v in result.per_class[name].items()},
                 "seeds_iou": _json_float(seeds.per_class[name]["iou"]) if seeds else None,
                 "pixels": int(counts[c].sum())}
                for c, name in enumerate(self.names)
            ],
            "confusion": counts.tolist(),  # rows: reference class, columns: predicted class, then 255
        }


REPORT_FORMAT = "weakclip-report/1"  # report.json's "format": what marks a folder as a report this package wrote


def _check_replaceable(out: Path) -> None:
    """``out`` may be replaced only when it is absent, an empty folder or an earlier report (its report.json
    says so): a folder of anything else is refused in one line and left as it is."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    try:
        ours = json.loads((out / "report.json").read_text()).get("format") == REPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise WeakclipError(f"{out}: exists and is not a weakclip report (no report.json of one); nothing was "
                            f"changed: choose a new or empty --output folder")


def _replace_folder(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder onto ``out``; an old report there is removed only afterwards."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def build_report(
    images_dir: str | os.PathLike,
    pred_dir: str | os.PathLike,
    output: str | os.PathLike,
    class_names: Sequence[str],
    seeds_dir: str | os.PathLike | None = None,
    gt_dir: str | os.PathLike | None = None,
    cams_dir: str | os.PathLike | None = None,
    ids: Sequence[str] | None = None,
    ignore_index: int = 255,
    card: dict | None = None,
    progress: bool = True,
) -> dict:
    """Write the report folder ``output`` (see the module docstring) atomically; return its summary:
    ``{"output", "index", "images", "problems": {kind: count}}``.

    Images are ``images_dir/<id>.jpg`` (or .jpeg, .png); label maps ``<folder>/<id>.png``; CAMs
    ``cams_dir/<id>.npz`` (``weakclip seeds --save-cams``). Which images: ``ids`` (a split list; every
    listed image gets a row, so a missing prediction is named), else every PNG in ``pred_dir``.
    """
    images_dir, pred_dir, output = Path(images_dir), Path(pred_dir), Path(output)
    layers = [Layer(key, title, Path(folder), suffix) for key, title, folder, suffix in (
        ("seeds", "seeds", seeds_dir, ".png"), ("cams", "CAMs", cams_dir, ".npz"),
        ("pred", "pseudo masks", pred_dir, ".png"), ("gt", "ground truth", gt_dir, ".png")) if folder is not None]
    for folder in (images_dir, *(layer.folder for layer in layers)):
        if not folder.is_dir():
            raise WeakclipError(f"{folder}: folder not found")
    if ids is None:
        ids = [p.stem for p in visible_files(pred_dir, "*.png")]
        if not ids:
            raise WeakclipError(f"{pred_dir}: no prediction PNGs found")
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise WeakclipError("report: the list of image ids is empty")

    _check_replaceable(output)

    from tqdm import tqdm

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        builder = _Builder(staging, images_dir, layers, class_names, ignore_index)
        rows = [builder.image(i) for i in tqdm(ids, desc="report", unit="img", disable=not progress)]
        data = {
            "format": REPORT_FORMAT,
            "classes": list(class_names),
            "colors": ["#%02x%02x%02x" % tuple(c) for c in voc_palette()[: len(class_names)].tolist()],
            "ignore_color": "#%02x%02x%02x" % tuple(voc_palette()[ignore_index].tolist()),
            "ignore_index": ignore_index,
            "layers": [{"key": x.key, "title": x.title, "folder": str(x.folder.resolve())} for x in layers],
            "images_dir": str(images_dir.resolve()),
            "problems": dict(sorted(builder.problems.items())),
            "class_table": builder.class_table(),
            "card": card,
            "rows": rows,
        }
        (staging / "report.json").write_text(json.dumps(data, indent=None, separators=(",", ":")) + "\n")
        (staging / "index.html").write_text(render_page(data))
        _replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"output": str(output), "index": str(output / "index.html"), "images": len(rows),
            "problems": data["problems"]}

"""The protocol card: what made a set of label maps and how they were scored, as one JSON-ready dict.

The HTML report shows it and ``weakclip evaluate --json`` records it, so a score is never separated from
the command, config, checkpoint, CLIP weights, list and inference settings that produced it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..config import Config, _resolve_file
from ..errors import WeakclipError
from ..fileio import file_sha256


def _manifest(pred_dir: Path | None) -> dict:
    """``pred_dir/manifest.json`` as written by ``weakclip pseudo-masks`` / ``predict`` / ``seeds``, or {}."""
    if pred_dir is None or not (pred_dir / "manifest.json").is_file():
        return {}
    try:
        manifest = json.loads((pred_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def _clip_identity(cfg: Config, manifest: dict) -> str:
    """The CLIP weights the label maps were made with: the manifest's record, else the config's weights."""
    refiner = manifest.get("refiner", {})
    if refiner is None:  # written by a retrained segmenter: no CLIP made these maps
        return "none (the maps' manifest records no refiner)"
    if isinstance(refiner, dict) and refiner.get("clip_weights"):
        return str(refiner["clip_weights"])
    from ..checkpoints import clip_weights_identity

    try:
        return clip_weights_identity(cfg.model.clip)
    except OSError as exc:  # a weights file named by the config but absent here
        return f"{cfg.model.clip.pretrained} (unreadable: {exc.strerror or exc})"


def protocol_card(cfg: Config, config_arg: str, overrides: Sequence[str] = (), pred_dir: str | os.PathLike | None
                  = None, list_path: str | os.PathLike | None = None, command: Sequence[str] | None = None
                  ) -> dict:
    """The card: command, config (name, file, sha256, overrides), checkpoint and CLIP identities, split and
    list, scales, flip, CRF parameters, label filter, package version and date (UTC).

    Checkpoint, CLIP identity and inference settings come from ``pred_dir/manifest.json`` when the label
    maps carry one (what really made them; ``source`` says so), else from the config.
    """
    pred_dir = Path(pred_dir) if pred_dir is not None else None
    manifest = _manifest(pred_dir)
    try:
        config_file = _resolve_file(config_arg)
        config = {"name": cfg.name, "file": str(config_file.resolve()), "sha256": file_sha256(config_file)}
    except WeakclipError:  # a config built in code, not read from a file
        config = {"name": cfg.name, "file": None, "sha256": None}
    config["overrides"] = list(overrides)
    infer = manifest.get("infer") if isinstance(manifest.get("infer"), dict) else None
    if infer is None:
        infer = dataclasses.asdict(cfg.infer)
    listing = None
    if list_path is not None:
        path = Path(list_path)
        ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        listing = {"file": str(path.resolve()), "sha256": file_sha256(path), "images": len(ids)}
    crf = infer.get("crf_params") if infer.get("crf", True) else None
    return {
        "command": shlex.join(["weakclip", *(sys.argv[1:] if command is None else command)]),
        "config": config,
        "checkpoint": {"sha256": manifest.get("checkpoint_sha256")} if manifest.get("checkpoint_sha256") else None,
        "clip": {"model": cfg.model.clip.model, "weights": _clip_identity(cfg, manifest)},
        "split": cfg.data.split,
        "list": listing,
        "scales": infer.get("scales"),
        "flip": infer.get("flip"),
        "crf": crf,
        "label_filter": infer.get("label_filter"),
        "source": f"{pred_dir / 'manifest.json'}" if manifest else "config",
        "weakclip_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

"""Parity with released code: compare our computation with tensors recorded by running the authors' code.

A fixture is a folder with ``config.json`` and safetensors files (see ``../shared/reference/parity``). Each
fixture kind registers a checker that fills a :class:`ParityReport`; :func:`check_fixture` picks the
checker from the fixture's ``config.json``. ``benchmarks/parity.py`` and the tests call the same code.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import WeakclipError


def _as_double(x: Tensor | np.ndarray) -> Tensor:
    return torch.as_tensor(x).detach().double().cpu()


@dataclass
class ParityReport:
    """Worst errors per compared tensor, and the names of the comparisons that failed."""

    worst: dict[str, dict[str, float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def close(self, name: str, ours: Tensor | np.ndarray, ref: Tensor | np.ndarray, atol: float,
              rtol: float) -> bool:
        """Record ``|ours - ref| <= atol + rtol * |ref|`` elementwise; shapes must agree exactly."""
        a, b = _as_double(ours), _as_double(ref)
        if a.shape != b.shape:
            self.worst[name] = {"max_abs": float("inf"), "max_rel": float("inf")}
            self.failed.append(f"{name}: shape {tuple(a.shape)} != reference {tuple(b.shape)}")
            return False
        diff = (a - b).abs()
        max_abs = float(diff.max()) if diff.numel() else 0.0
        max_rel = float((diff / b.abs().clamp_min(1e-12)).max()) if diff.numel() else 0.0
        self.worst[name] = {"max_abs": max_abs, "max_rel": max_rel}
        ok = bool((diff <= atol + rtol * b.abs()).all())
        if not ok:
            self.failed.append(f"{name}: max_abs {max_abs:.3g} (atol {atol:g}, rtol {rtol:g})")
        return ok

    def equal(self, name: str, ours: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> bool:
        """Record exact equality (label maps, integer outputs)."""
        a, b = np.asarray(torch.as_tensor(ours).cpu()), np.asarray(torch.as_tensor(ref).cpu())
        if a.shape != b.shape:
            self.failed.append(f"{name}: shape {a.shape} != reference {b.shape}")
            self.worst[name] = {"max_abs": float("inf"), "max_rel": float("inf")}
            return False
        mismatch = int((a != b).sum())
        self.worst[name] = {"max_abs": float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0)),
                            "max_rel": mismatch / max(a.size, 1)}
        if mismatch:
            self.failed.append(f"{name}: {mismatch} of {a.size} elements differ")
        return mismatch == 0

    def measure(self, name: str, ours: Tensor | np.ndarray, ref: Tensor | np.ndarray, as_labels: bool = False
                ) -> None:
        """Record the worst error without judging it (a comparison that is reported, not required).

        With ``as_labels`` the entry's ``max_rel`` is the fraction of differing elements.
        """
        a, b = _as_double(ours), _as_double(ref)
        diff = (a - b).abs()
        rel = float((diff > 0).double().mean()) if as_labels else float((diff / b.abs().clamp_min(1e-12)).max())
        self.worst[name] = {"max_abs": float(diff.max()), "max_rel": rel}

    def to_json(self) -> dict:
        return {"pass": not self.failed and bool(self.worst), "worst": self.worst, "failed": self.failed}


# fixture kind -> checker(fixture dir, config dict, report)
Checker = Callable[[Path, dict, ParityReport], None]
_CHECKERS: dict[str, Checker] = {}


def register_checker(kind: str) -> Callable[[Checker], Checker]:
    """Decorator: ``kind`` is what :func:`fixture_kind` returns for the fixtures the checker handles."""
    def wrap(fn: Checker) -> Checker:
        _CHECKERS[kind] = fn
        return fn
    return wrap


def fixture_kind(config: dict) -> str:
    """``'weakclip'`` or ``'clip-es'``, from the released repository recorded in the fixture's config
    (under ``official`` or ``source``)."""
    origin = config.get("official") or config.get("source") or {}
    repo = str(origin.get("repo", "")).lower() if isinstance(origin, dict) else ""
    if "weakclip" in repo:
        return "weakclip"
    if "clip-es" in repo:
        return "clip-es"
    raise WeakclipError(f"unknown parity fixture: its released repository is {repo!r}")


def check_fixture(fixture: str | Path) -> ParityReport:
    """Run every comparison a fixture folder supports and return the report."""
    fixture = Path(fixture)
    cfg_path = fixture / "config.json"
    if not cfg_path.is_file():
        raise WeakclipError(f"{cfg_path}: not found (a parity fixture holds config.json and safetensors files)")
    config = json.loads(cfg_path.read_text())
    kind = fixture_kind(config)
    _load_checkers()
    if kind not in _CHECKERS:
        raise WeakclipError(f"{fixture}: no checker for {kind!r} fixtures")
    report = ParityReport()
    _CHECKERS[kind](fixture, config, report)
    return report


def _load_checkers() -> None:
    """Import the modules whose checkers register themselves."""
    from . import clip_es, weakclip  # noqa: F401

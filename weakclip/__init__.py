"""WeakCLIP: frozen CLIP refines CAM seeds into pseudo masks for weakly-supervised segmentation.

The Python API (see :mod:`weakclip.api`): :class:`Refiner` (pseudo masks of a trained refiner, one image
at a time, and checkpoints that travel: ``save_pretrained`` / ``from_pretrained``), :class:`ClipES`
(CLIP-ES seeds), :func:`load_config`; the stages as functions are in :mod:`weakclip.api` (``train``,
``pseudo_masks``, ``seeds``, ``evaluate``). They load on first use, so ``import weakclip`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Names served lazily from weakclip.api (torch, open_clip and the rest load on first use).
_API = ("ClipES", "Refined", "Refiner", "Seed", "load_config")
__all__ = ["ClipES", "Refined", "Refiner", "Seed", "__version__", "load_config"]  # _API and the version

if TYPE_CHECKING:
    from .api import ClipES, Refined, Refiner, Seed, load_config


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'weakclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})

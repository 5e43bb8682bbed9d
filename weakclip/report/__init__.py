"""A self-contained HTML report of a run: images, seeds, CAMs, pseudo masks and ground truth, scored."""

from .build import build_report
from .card import protocol_card

__all__ = ["build_report", "protocol_card"]

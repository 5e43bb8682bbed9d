"""Nested part entries in configs: overrides reach them, typos are named, and the flat keys of configs written
before them (stored in older checkpoints) are moved to their nested places with a warning."""

from __future__ import annotations

import logging

import pytest

from weakclip.config import BackboneConfig, CoAttentionConfig, config_from_dict, config_to_dict, load_config
from weakclip.errors import WeakclipError


def test_overrides_reach_the_nested_part_entries():
    cfg = load_config("voc-rn50", ["model.co_attention.type=none", "model.co_attention.width=128"])
    assert cfg.model.clip.model == "RN50" and cfg.model.backbone == BackboneConfig(type="clip-resnet")
    assert cfg.model.co_attention == CoAttentionConfig(type="none", width=128)
    assert load_config("voc").model.backbone.type == "auto"


def test_a_misspelt_part_key_is_named_with_a_suggestion():
    with pytest.raises(WeakclipError, match=r"model.co_attention.widht: unknown config key \(did you mean 'width'\?\)"):
        load_config("voc", ["model.co_attention.widht=128"])


@pytest.mark.parametrize(("released", "on", "kind"), [(False, True, "bidirectional"), (True, True, "released"),
                                                       (False, False, "none")])
def test_flat_keys_of_older_configs_move_to_their_nested_entries(caplog, released, on, kind):
    tree = config_to_dict(load_config("voc"))
    model = tree["model"]
    del model["backbone"], model["co_attention"]
    model.update(released=released, co_attention=on, coattn_width=128, coattn_heads=2, coattn_layers=1,
                 coattn_dropout=0.0, alpha_init=0.5, beta_init=0.25)
    model["clip"].update(taps=[2, 4, 6, 8], class_token_twice=True)
    with caplog.at_level(logging.WARNING):
        cfg = config_from_dict(tree)
    assert cfg.model.co_attention == CoAttentionConfig(type=kind, width=128, heads=2, layers=1, dropout=0.0,
                                                       alpha_init=0.5, beta_init=0.25)
    assert cfg.model.backbone == BackboneConfig(taps=[2, 4, 6, 8], class_token_twice=True)
    assert "model.coattn_width -> model.co_attention.width" in caplog.text
    assert "model.clip.taps -> model.backbone.taps" in caplog.text
    assert tree["model"]["clip"]["taps"] == [2, 4, 6, 8]  # the caller's mapping is left as it was
    assert config_from_dict(config_to_dict(cfg)) == cfg  # what is saved now loads as it is, without a warning

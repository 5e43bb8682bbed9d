"""Checker for fixtures recorded from the released CLIP-ES code (``clip-es-tiny``).

The fixture's random CLIP (OpenAI key names) is loaded into open_clip and every image goes through
:class:`weakclip.clip_es.ClipES` in ``released`` mode; each recorded tensor is compared with the matching
intermediate. Tolerances: integers, boxes and label maps exact; the text features 1e-6 (open_clip encodes
the prompts batched with fused attention, the released code one at a time with explicit softmax: ~2e-7);
float32 maps downstream of them 1e-5 (Grad-CAM divides by a spread that amplifies those ~1e-7 to ~6e-6);
float16 CAMs and CRF inputs one float16 unit in the last place at 1.0 (2^-11 ~ 4.9e-4, the rounding of a
map within 1e-5 of a float16 boundary); CRF marginals 1e-3 (pydensecrf on float16 unaries that may differ
by that one unit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..clip_es import ClipES, crf_seed, seed_without_crf
from ..config import CRFConfig, SeedsConfig
from ..errors import WeakclipError
from . import ParityReport, register_checker

FP16_ULP = 2.0**-11  # one float16 unit in the last place just below 1.0
TOL_TEXT = 1e-6
TOL_F32 = 1e-5
TOL_CRF_Q = 1e-3


def fixture_model(fixture: Path, config: dict) -> torch.nn.Module:
    """The fixture's random CLIP in open_clip, built from the dims in ``config['model']``."""
    m = config["model"]
    vision = open_clip.model.CLIPVisionCfg(
        layers=m["vision_layers"], width=m["vision_width"], patch_size=m["vision_patch_size"],
        image_size=m["image_resolution"], head_width=m["vision_head_dim"])
    text = open_clip.model.CLIPTextCfg(
        context_length=m["context_length"], vocab_size=m["vocab_size"], width=m["transformer_width"],
        heads=m["transformer_heads"], layers=m["transformer_layers"])
    model = open_clip.CLIP(m["embed_dim"], vision, text, quick_gelu=True)
    state = load_file(str(fixture / "clip_state_dict.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeakclipError(f"{fixture}: state dict does not fit open_clip's CLIP "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.float().eval()


def fixture_settings(config: dict, released: bool = True) -> SeedsConfig:
    """The fixture's constants as a ``seeds`` config."""
    t, caa, crf = config["text"], config["caa"], config["crf"]
    return SeedsConfig(
        released=released, template=t["template"],
        prompt_names=dict(zip(t["class_names"], t["prompt_class_names"])),
        background=list(t["background_categories"]), box_threshold=caa["box_threshold_voc"],
        caa_layers=8, sinkhorn_iters=caa["sinkhorn_iterations"], crf=True,
        crf_params=CRFConfig(crf["pos_xy_std"], crf["pos_w"], crf["bi_xy_std"], crf["bi_rgb_std"], crf["bi_w"],
                             crf["iter_max"]),
        confidence=crf["ignore_confidence_below"], bg_power=1.0, precision="fp32")


def run_fixture(fixture: Path, config: dict, released: bool = True) -> tuple[ClipES, dict[str, dict]]:
    """Run every fixture image through CLIP-ES; returns the method and each image's trace by id prefix."""
    method = ClipES(fixture_model(fixture, config), ["background", *config["text"]["class_names"]],
                    fixture_settings(config, released))
    traces = {}
    with safe_open(str(fixture / "inputs.safetensors"), "pt") as f:
        for i in range(len(config["images"])):
            image = f.get_tensor(f"img{i}.image").numpy()
            labels = [int(c) for c in f.get_tensor(f"img{i}.labels")]
            trace: dict = {"labels": labels}
            cams = method.cams(image, labels, trace)
            trace["attn_highres"] = cams
            trace["seed_nocrf_alpha1"] = seed_without_crf(cams, labels, 1)
            trace["seed_nocrf_alpha2"] = seed_without_crf(cams, labels, 2)
            trace["pseudo_mask_crf"] = crf_seed(cams, image, labels, method.cfg, trace=trace)
            traces[f"img{i}"] = trace
    return method, traces


def _padded_boxes(boxes: list[list[tuple[int, int, int, int]]], rows: int) -> np.ndarray:
    out = np.full((len(boxes), rows, 4), -1, dtype=np.int32)
    for k, bs in enumerate(boxes):
        out[k, : min(len(bs), rows)] = np.asarray(bs[:rows], dtype=np.int32).reshape(-1, 4)
    return out


@register_checker("clip-es")
def check_clip_es(fixture: Path, config: dict, report: ParityReport) -> None:
    method, traces = run_fixture(fixture, config)
    ref = load_file(str(fixture / "outputs.safetensors"))
    nfg = method.num_fg
    report.equal("text.fg_tokens", method.tokens[:nfg].int(), ref["text.fg_tokens"])
    report.equal("text.bg_tokens", method.tokens[nfg:].int(), ref["text.bg_tokens"])
    report.close("text.fg_features", method.text[:nfg], ref["text.fg_features"], TOL_TEXT, 0)
    report.close("text.bg_features", method.text[nfg:], ref["text.bg_features"], TOL_TEXT, 0)
    for img, t in traces.items():
        k = len(t["labels"])
        gh, gw = t["cam_raw"].shape[1:]
        r = {name.split(".", 1)[1]: v for name, v in ref.items() if name.startswith(img + ".")}
        report.close(f"{img}.input", t["input"], r["input"], TOL_F32, 0)
        report.close(f"{img}.pos_embed", t["pos_embed"], r["pos_embed"], 0, 0)
        report.close(f"{img}.tokens_before_last_block", t["tokens_before_last_block"][:, None],
                     r["tokens_before_last_block"], TOL_F32, 0)
        report.close(f"{img}.attn_layers", torch.stack(t["attn_layers"]), r["attn_layers"][-len(t["attn_layers"]):],
                     TOL_F32, 0)
        act = t["activation"].T.reshape(-1, gh, gw)
        report.close(f"{img}.gradcam_activation", act, r["gradcam_activation"], TOL_F32, 0)
        grads = t["grads"].transpose(1, 2).reshape(k, -1, gh, gw)
        report.close(f"{img}.gradcam_grads", grads, r["gradcam_grads"], TOL_F32, 0)
        report.close(f"{img}.probs", t["probs"], r["probs"], TOL_F32, 0)
        report.close(f"{img}.image_embed", t["image_embed"], r["image_embed"], TOL_F32, 0)
        report.close(f"{img}.cam_raw", t["cam_raw"], r["cam_raw"], TOL_F32, 0)
        report.close(f"{img}.cam_raw_highres", t["cam_raw_highres"], r["cam_raw_highres"], TOL_F32, 0)
        report.equal(f"{img}.box_counts", np.asarray([len(b) for b in t["boxes"]], np.int32), r["box_counts"])
        report.equal(f"{img}.boxes", _padded_boxes(t["boxes"], r["boxes"].shape[1]), r["boxes"])
        report.close(f"{img}.affinity", t["affinity"], r["affinity"], TOL_F32, 0)
        report.close(f"{img}.trans_mat", t["trans_mat"], r["trans_mat"], TOL_F32, 0)
        report.equal(f"{img}.aff_mask", t["aff_mask"], r["aff_mask"])
        report.close(f"{img}.cam_refined", t["cam_refined"], r["cam_refined"], TOL_F32, 0)
        report.close(f"{img}.cam_refined_highres", t["cam_refined_highres"], r["cam_refined_highres"], TOL_F32, 0)
        report.close(f"{img}.attn_highres", t["attn_highres"], r["attn_highres"], FP16_ULP, 0)
        report.equal(f"{img}.keys", np.asarray(t["labels"]) - 1, r["keys"])
        for name in ("seed_nocrf_alpha1", "seed_nocrf_alpha2", "crf_image", "pseudo_label_crf",
                     "pseudo_mask_crf"):
            report.equal(f"{img}.{name}", t[name], r[name])
        report.close(f"{img}.crf_prob_in", t["crf_prob_in"], r["crf_prob_in"], FP16_ULP, 0)
        report.close(f"{img}.crf_q", t["crf_q"], r["crf_q"], TOL_CRF_Q, 0)

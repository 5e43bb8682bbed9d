"""Checker for fixtures recorded from the released CLIP-ES code (``clip-es-tiny``).

The fixture's random CLIP (OpenAI key names) is loaded into open_clip and every image goes through
:class:`weakclip.clip_es.ClipES` in ``released`` mode, once in float32 and once in float64; each recorded
tensor is compared with the matching intermediate under the bounds of :mod:`weakclip.parity`: float maps
``RTOL * (|ref| + max|ref|) + FP64_FACTOR * max|fp32 - fp64|`` (Grad-CAM's min-max normalisation amplifies
float32 rounding, which the float64 run measures); float16 CAMs and CRF inputs one float16 unit in the
last place more; CRF marginals their inputs' float16 unit propagated through the CRF
(:func:`crf_unit_response`: pydensecrf runs in float32 only, so there is no float64 run, and one unit in
its float16 input moves the marginals by 1e-2 or more, more than the 1e-3 used before); token ids, boxes, box masks, kept
classes and the CRF colour image exact; seeds only at pixels whose decision margin is within the bound
of the scores that decide them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..clip_es import ClipES, background_scores, crf_image, crf_seed, seed_without_crf
from ..config import CRFConfig, SeedsConfig
from ..crf import dense_crf_pydensecrf
from ..errors import WeakclipError
from . import FP64_FACTOR, RTOL, ParityReport, fp16_ulp, register_checker, top2_margin

FLOAT16 = ("attn_highres", "crf_prob_in")  # stored rounded to float16 by the released code
EXACT = ("box_counts", "boxes", "aff_mask", "keys", "crf_image")  # no float decision makes them


def fixture_model(fixture: Path, config: dict, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The fixture's random CLIP in open_clip, built from the dims in ``config['model']``, in ``dtype``."""
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
    return model.to(dtype).eval()


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


def run_fixture(fixture: Path, config: dict, released: bool = True, dtype: torch.dtype = torch.float32
                ) -> tuple[ClipES, dict[str, dict]]:
    """Run every fixture image through CLIP-ES; returns the method and each image's trace by id prefix."""
    method = ClipES(fixture_model(fixture, config, dtype), ["background", *config["text"]["class_names"]],
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


def fixture_outputs(method: ClipES, traces: dict[str, dict], ref: dict) -> dict[str, object]:
    """Our value of every recorded tensor, by its recorded name, from one run's traces."""
    nfg = method.num_fg
    out: dict[str, object] = {"text.fg_tokens": method.tokens[:nfg].int(), "text.bg_tokens": method.tokens[nfg:].int(),
                              "text.fg_features": method.text[:nfg], "text.bg_features": method.text[nfg:]}
    for img, t in traces.items():
        k = len(t["labels"])
        gh, gw = t["cam_raw"].shape[1:]
        n_attn = len(t["attn_layers"])
        values = {
            "input": t["input"], "pos_embed": t["pos_embed"],
            "tokens_before_last_block": t["tokens_before_last_block"][:, None],
            "attn_layers": torch.stack(t["attn_layers"]),
            "gradcam_activation": t["activation"].T.reshape(-1, gh, gw),
            "gradcam_grads": t["grads"].transpose(1, 2).reshape(k, -1, gh, gw),
            "box_counts": np.asarray([len(b) for b in t["boxes"]], np.int32),
            "boxes": _padded_boxes(t["boxes"], ref[f"{img}.boxes"].shape[1]),
            "keys": np.asarray(t["labels"]) - 1,
            **{name: t[name] for name in (
                "probs", "image_embed", "cam_raw", "cam_raw_highres", "affinity", "trans_mat", "aff_mask",
                "cam_refined", "cam_refined_highres", "attn_highres", "seed_nocrf_alpha1", "seed_nocrf_alpha2",
                "crf_image", "pseudo_label_crf", "pseudo_mask_crf", "crf_prob_in", "crf_q")},
        }
        out.update({f"{img}.{name}": v for name, v in values.items()})
        # The released code records the attention of its last blocks only.
        out[f"{img}.attn_layers"] = (values["attn_layers"], slice(-n_attn, None))
    return out


def _largest_bound(ours: np.ndarray, ref: torch.Tensor, fp64: np.ndarray, extra: torch.Tensor) -> float:
    """The largest allowance of :meth:`ParityReport.close` for these arguments (the bound of the scores a
    label map decides on)."""
    spread = float(np.abs(np.asarray(ours, np.float64) - np.asarray(fp64, np.float64)).max())
    return float(RTOL * 2 * ref.double().abs().max() + FP64_FACTOR * spread + extra.max())


def crf_unit_response(probs: np.ndarray, image: np.ndarray, cfg: SeedsConfig) -> float:
    """How far the CRF's marginals move when every float16 input moves by one unit in the last place
    (signs drawn with a fixed seed): the float16 rounding of the CRF's input propagated through it."""
    ulp = fp16_ulp(probs).numpy()
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=probs.shape)
    moved = (probs.astype(np.float64) + signs * ulp).astype(np.float16)
    rgb = crf_image(image, cfg.released)
    return float(np.abs(dense_crf_pydensecrf(moved, rgb, cfg.crf_params) -
                        dense_crf_pydensecrf(probs, rgb, cfg.crf_params)).max())


@register_checker("clip-es")
def check_clip_es(fixture: Path, config: dict, report: ParityReport) -> None:
    ref = load_file(str(fixture / "outputs.safetensors"))
    method, traces = run_fixture(fixture, config)
    _, traces64 = run_fixture(fixture, config, dtype=torch.float64)
    ours, ours64 = fixture_outputs(method, traces, ref), fixture_outputs(method, traces64, ref)
    special = (*EXACT, *FLOAT16, "crf_q", "seed_nocrf_alpha1", "seed_nocrf_alpha2", "pseudo_label_crf",
               "pseudo_mask_crf")
    for name, value in ours.items():
        if name.endswith("_tokens"):
            report.equal(name, value, ref[name])
        elif isinstance(value, tuple):  # (tensor, the part of the reference it matches)
            report.close(name, value[0], ref[name][value[1]], fp64=ours64[name][0])
        elif name.split(".", 1)[1] not in special:
            report.close(name, value, ref[name], fp64=ours64[name])
    inputs = load_file(str(fixture / "inputs.safetensors"))
    for img, t in traces.items():
        t64 = traces64[img]
        r = {name.split(".", 1)[1]: v for name, v in ref.items() if name.startswith(img + ".")}
        for name in EXACT:
            report.equal(f"{img}.{name}", ours[f"{img}.{name}"], r[name])
        # float16 maps: the float64 run's maps before the rounding measure the float32 rounding.
        unrounded = {"attn_highres": t64["cam_refined_highres"],
                     "crf_prob_in": background_scores(t64["cam_refined_highres"], 1)}
        for name in FLOAT16:
            report.close(f"{img}.{name}", t[name], r[name], fp64=unrounded[name], extra=fp16_ulp(r[name]))
        cam = _largest_bound(t["cam_refined_highres"], r["attn_highres"], t64["cam_refined_highres"],
                             fp16_ulp(r["attn_highres"]))
        for power in (1, 2):  # background (1 - max cam)^power moves by at most power x the CAMs' bound
            scores64 = background_scores(t64["cam_refined_highres"], power)
            report.labels(f"{img}.seed_nocrf_alpha{power}", t[f"seed_nocrf_alpha{power}"],
                          r[f"seed_nocrf_alpha{power}"], top2_margin(scores64), (1 + power) * cam)
        # pydensecrf runs in float32 only: no float64 run; the bound is its inputs' unit propagated.
        unit = crf_unit_response(t["crf_prob_in"], inputs[f"{img}.image"].numpy(), method.cfg)
        report.close(f"{img}.crf_q", t["crf_q"], r["crf_q"], extra=unit)
        q = torch.from_numpy(t["crf_q"]).double()
        bound = RTOL * 2 * float(r["crf_q"].abs().max()) + unit
        argmax_margin = top2_margin(q) / (2 * bound)
        report.labels(f"{img}.pseudo_label_crf", t["pseudo_label_crf"], r["pseudo_label_crf"], argmax_margin, 1.0)
        threshold_margin = (q.max(0).values - method.cfg.confidence).abs() / bound
        report.labels(f"{img}.pseudo_mask_crf", t["pseudo_mask_crf"], r["pseudo_mask_crf"],
                      torch.minimum(argmax_margin, threshold_margin), 1.0)

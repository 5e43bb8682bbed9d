"""Checker for fixtures recorded from the released WeakCLIP code (``weakclip-tiny``, ``weakclip-tiny-odd``).

The fixture's official ``state_dict`` is converted (:mod:`weakclip.released`) into this package's model in
``released`` mode, then every recorded tensor is recomputed from the recorded inputs and compared:

* network intermediates, each from the module that produces it (taps, adapter levels, embeddings, text
  features, co-attention outputs, score map, neck in/out, head sum and logits), and the model's own fast
  forward (fused lateral deconvolutions, shared head upsampling, shared text prefix) against the logits;
* the training losses with their intermediates (resized logits and seeds, probabilities, CRF colours and
  CRF target) and the gradients of the total;
* test time: the first sliding window, the single-scale sliding-window logits and the multi-scale flip
  probabilities from the recorded views, their argmax and kept classes, and the offline CRF (its marginals
  and the label map);
* our own test-time resizing of the stored uint8 image (``own_views.*``), with the view resizing that
  released mode uses (OpenCV bilinear) and, measured but not judged, with the default torch resizing.

Tolerances. Every float comparison is ``|ours - ref| <= RTOL * (|ref| + max|ref|)``: float32 arithmetic in
another order (fused kernels, other BLAS blocking, sums regrouped) moves results by a few ulp per
operation, about 1e-7 relative, and deep stacks (12 ViT blocks, 10 CRF iterations) compound that to ~1e-6;
``RTOL`` = 1e-5 leaves a margin of ten while a real difference (a dropped bias, a wrong resize, a swapped
norm) shows as 1e-3 or more. Scaling by the tensor's largest magnitude keeps entries that cancel to near 0
from failing on absolute noise. The CRF runs pydensecrf on float32 unaries, so its marginals get
``CRF_RTOL`` = 1e-4. Integer outputs (token ids, label maps, kept classes, CRF colours) must be identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from ..config import Config, CRFConfig, InferConfig, LossConfig
from ..crf import dense_crf_pydensecrf
from ..infer import multiscale_probs, sliding_logits, view_probs
from ..losses import weakclip_losses
from ..model import WeakCLIP, build_model, cosine_score_map
from ..released import convert_state_dict, released_config
from . import ParityReport, register_checker

RTOL = 1e-5
CRF_RTOL = 1e-4


def _close(report: ParityReport, name: str, ours: Tensor, ref: Tensor, rtol: float = RTOL) -> None:
    ref = torch.as_tensor(ref)
    scale = float(ref.double().abs().max()) if ref.numel() else 0.0
    report.close(name, ours, ref, atol=rtol * scale, rtol=rtol)


def build_released_model(fixture: Path, config: dict) -> tuple[WeakCLIP, Config]:
    """The fixture's official state dict converted into our model (released mode, eval)."""
    m = config["model"]
    state = load_file(str(fixture / "state_dict.safetensors"))
    conversion = convert_state_dict(
        state, str(fixture / "state_dict.safetensors"), vision_heads=m["backbone"]["heads"],
        text_heads=m["text_encoder"]["transformer_heads"], coattn_heads=m["context_decoder"]["transformer_heads"])
    cfg = released_config(Config(), conversion, m["class_names"])
    model = build_model(cfg.model, cfg.data.class_names)
    model.load_weakclip_state_dict(conversion.state, str(fixture))
    return model.eval(), cfg


def _infer_settings(config: dict) -> InferConfig:
    inf = config["inference"]
    crop = inf["test_cfg"]["crop_size"][0]
    stride = inf["test_cfg"]["stride"][0]
    short = min(inf["test_pipeline_img_scale"])
    c = config["crf_post"]
    crf = CRFConfig(c["gaussian_sxy"], c["gaussian_compat"], c["bilateral_sxy"], c["bilateral_srgb"],
                    c["bilateral_compat"], c["t"])
    return InferConfig(short_side=short, scales=list(inf["img_ratios"]), flip=bool(inf["flip"]), crop_size=crop,
                       stride=stride, crf_params=crf, view_resize="cv2")


def _check_network(model: WeakCLIP, inputs: dict, ref: dict, report: ParityReport) -> None:
    img = inputs["img"]
    report.close("normalize", model.normalize(inputs["image_uint8"].permute(0, 3, 1, 2)), img, atol=0, rtol=0)
    report.equal("text.token_ids", model.text.tokens, ref["text.token_ids"])
    with torch.no_grad():
        feats = model.visual(img)
        for i, tap in enumerate(feats.taps):
            _close(report, f"backbone.tap.{i}", tap, ref[f"backbone.tap.{i}"])
        levels = model.adapter(feats.taps)
        for i, level in enumerate(levels):
            _close(report, f"backbone.adapter.{i}", level, ref[f"backbone.adapter.{i}"])
        _close(report, "backbone.global_embedding", feats.global_embedding, ref["backbone.global_embedding"])
        _close(report, "backbone.dense_embedding", feats.dense, ref["backbone.dense_embedding"])
        text = model.text()[None]
        _close(report, "text.features", text, ref["text.features"])
        if model.text.share_prefix:  # the fast path above; the plain causal pass over all 13 tokens too
            model.text.share_prefix = False
            _close(report, "text.features_full_pass", model.text()[None], ref["text.features"])
            model.text.share_prefix = True
        b = feats.dense.shape[0]
        tokens = torch.cat([feats.global_embedding[:, None], feats.dense.flatten(2).transpose(1, 2)], dim=1)
        _close(report, "coattn.visual_context", tokens, ref["coattn.visual_context"])
        text = text.expand(b, -1, -1)
        co = model.co_attention
        d_text, d_visual = co.deltas(text, tokens)
        _close(report, "coattn.text_diff", d_text, ref["coattn.text_diff"])
        _close(report, "coattn.visual_diff", d_visual, ref["coattn.visual_diff"])
        text_after, dense_after = co(text, feats.dense, feats.global_embedding)
        _close(report, "coattn.text_after", text_after, ref["coattn.text_after"])
        _close(report, "coattn.dense_after", dense_after, ref["coattn.dense_after"])
        score = cosine_score_map(text_after, dense_after)
        _close(report, "score_map", score, ref["score_map"])
        neck_in = [torch.cat([f, F.interpolate(score, size=f.shape[2:], mode="bilinear", align_corners=True)], 1)
                   for f in levels]
        for i, x in enumerate(neck_in):
            _close(report, f"neck.in.{i}", x, ref[f"neck.in.{i}"])
        neck_out = model.neck(levels, score)  # concatenates inside, by split lateral weights
        for i, x in enumerate(neck_out):
            _close(report, f"neck.out.{i}", x, ref[f"neck.out.{i}"])
        features = model.head.features(neck_out)
        _close(report, "head.features", features, ref["head.features"])
        _close(report, "head.logits", model.head.classifier(features), ref["head.logits"])
        # The model's own forward: split laterals, shared head upsampling, shared text prefix.
        fast = model.forward_normalized(img)
        _close(report, "forward.logits", fast["logits"], ref["head.logits"])
        _close(report, "forward.score_map", fast["score_map"], ref["score_map"])


def _loss_config(config: dict) -> LossConfig:
    lc = config["loss"]
    c = lc["crf_train"]
    crf = CRFConfig(c["gaussian_sxy"], c["gaussian_compat"], c["bilateral_sxy"], c["bilateral_srgb"],
                    c["bilateral_compat"], c["t"])
    return LossConfig(aux_weight=lc["identity_loss_weight"], tau=config["model"].get("tau", 0.07),
                      size=lc["feature_size"][0], crf_backend="pydensecrf", crf=crf)


def _check_losses(model: WeakCLIP, config: dict, inputs: dict, ref: dict, report: ParityReport) -> None:
    lcfg = _loss_config(config)
    out = model.forward_normalized(inputs["img"])
    logits, score = out["logits"], out["score_map"]
    logits.retain_grad()
    score.retain_grad()
    images = inputs["image_uint8"].permute(0, 3, 1, 2)
    trace: dict[str, Tensor] = {}
    losses = weakclip_losses(logits, score, inputs["seed"], images, lcfg, released=True, trace=trace)
    _close(report, "loss.logits_small", trace["logits_small"], ref["loss.logits_small"])
    seeds = trace["seeds_small"]
    report.equal("loss.seed_small", seeds[:, None].float(), ref["loss.seed_small"])
    k = logits.shape[1]
    cues = F.one_hot(torch.where(seeds < k, seeds, k), k + 1)[..., :k].permute(0, 3, 1, 2).float()
    report.equal("loss.cues", cues, ref["loss.cues"])
    _close(report, "loss.probs", trace["probs"], ref["loss.probs"])
    report.equal("loss.crf_image", trace["crf_image"].permute(0, 2, 3, 1), ref["loss.crf_image"])
    q = trace["crf_q"].double().clamp_min(1e-4)
    _close(report, "loss.crf_log_q", (q / q.sum(1, keepdim=True)).log(), ref["loss.crf_log_q"], CRF_RTOL)
    _close(report, "loss.seeding", losses["seed"], ref["loss.seeding"])
    _close(report, "loss.boundary", losses["boundary"], ref["loss.boundary"])
    _close(report, "loss.identity_ce", lcfg.aux_weight * losses["aux"], ref["loss.identity_ce"])
    with torch.no_grad():
        up = F.interpolate(score / lcfg.tau, size=images.shape[2:], mode="bilinear", align_corners=False)
        acc = (up.argmax(1) == inputs["seed"]).float().mean() * 100
    _close(report, "loss.identity_acc_seg", acc, ref["loss.identity_acc_seg"])
    _close(report, "loss.total", losses["total"], ref["loss.total"])
    losses["total"].backward()
    _close(report, "grad.head.logits", logits.grad, ref["grad.head.logits"])
    _close(report, "grad.score_map", score.grad, ref["grad.score_map"])
    _close(report, "grad.contexts", model.text.ctx.grad[None], ref["grad.contexts"])
    _close(report, "grad.gamma", model.co_attention.alpha.grad, ref["grad.gamma"])
    _close(report, "grad.beta", model.co_attention.beta.grad, ref["grad.beta"])
    _close(report, "grad.decode_head.conv_seg.weight", model.head.classifier.weight.grad,
           ref["grad.decode_head.conv_seg.weight"])
    _close(report, "grad.decode_head.scale_heads.3.0.conv.weight", model.head.branches[3][0][0].weight.grad,
           ref["grad.decode_head.scale_heads.3.0.conv.weight"])
    model.zero_grad(set_to_none=True)


def _check_inference(model: WeakCLIP, config: dict, inputs: dict, ref: dict, report: ParityReport) -> None:
    image = inputs.get("infer_image_uint8", inputs["image_uint8"][0]).numpy()
    size = image.shape[:2]
    icfg = _infer_settings(config)
    views = sorted((k for k in inputs if k.startswith("aug_view.")), key=lambda k: int(k.split(".")[1]))
    flips = [bool(v["flip"]) for v in config["inference"]["views"]] if "views" in config["inference"] else \
        [i % 2 == 1 for i in range(len(views))]
    single = config["inference"].get("single_scale_view_index", 2 * list(icfg.scales).index(1.0))

    def predict(x: Tensor) -> Tensor:
        return model.forward_normalized(x)["logits"]

    def slide(view: Tensor) -> Tensor:  # (3, h, w) -> window-averaged logits (1, K, h, w)
        return next(sliding_logits(predict, [view], icfg.crop_size, icfg.stride, 1))[1][None]

    with torch.no_grad():
        view = inputs[views[single]][0]
        _close(report, "infer.window0_logits", slide(view[:, : icfg.crop_size, : icfg.crop_size]),
               ref["infer.window0_logits"])
        logits = F.interpolate(slide(view), size=size, mode="bilinear", align_corners=False)
        _close(report, "infer.slide_logits", logits, ref["infer.slide_logits"])
        probs = sum(view_probs(predict, inputs[v], [f], size, icfg.crop_size, icfg.stride)[0]
                    for v, f in zip(views, flips)) / len(views)  # in the released order, view by view
    _close(report, "infer.aug_probs", probs, ref["infer.aug_probs"])
    pred = probs.argmax(0)
    report.equal("infer.aug_pred", pred, ref["infer.aug_pred"])
    keys = pred.unique()
    report.equal("infer.aug_keys", keys, ref["infer.aug_keys"])
    q = dense_crf_pydensecrf(np.ascontiguousarray(probs[keys].numpy()), image, icfg.crf_params)
    _close(report, "crf_post.q", torch.from_numpy(q), ref["crf_post.q"], CRF_RTOL)
    report.equal("crf_post.label", keys.numpy().astype(np.uint8)[q.argmax(0)], ref["crf_post.label"])

    # Our own test-time resizing from the stored uint8 image.
    def predict_uint8(x: Tensor) -> Tensor:
        return model(x)["logits"]

    for method in ("cv2", "torch"):
        own = multiscale_probs(predict_uint8, image, InferConfig(**{**icfg.__dict__, "view_resize": method}),
                               torch.device("cpu"))
        name = f"own_views.{method}"
        if method == "cv2":
            _close(report, f"{name}.aug_probs", own, ref["infer.aug_probs"])
            report.equal(f"{name}.aug_pred", own.argmax(0), ref["infer.aug_pred"])
        else:
            report.measure(f"{name}.aug_probs", own, ref["infer.aug_probs"])
            report.measure(f"{name}.aug_pred", own.argmax(0), ref["infer.aug_pred"], as_labels=True)


@register_checker("weakclip")
def check_weakclip(fixture: Path, config: dict, report: ParityReport) -> None:
    """Every comparison the fixture supports (see the module docstring)."""
    torch.manual_seed(0)
    inputs = load_file(str(fixture / "inputs.safetensors"))
    ref = load_file(str(fixture / "outputs.safetensors"))
    model, _ = build_released_model(fixture, config)
    _check_network(model, inputs, ref, report)
    _check_losses(model, config, inputs, ref, report)
    _check_inference(model, config, inputs, ref, report)

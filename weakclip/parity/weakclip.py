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

Bounds (:mod:`weakclip.parity`): the model runs once in float32 and once in float64, and every float
comparison allows ``RTOL * (|ref| + max|ref|) + FP64_FACTOR * max|fp32 - fp64|``; CRF marginals (pydensecrf
computes in float32 on float32 unaries) get ``CRF_RTOL`` = 1e-4 in place of ``RTOL``. Token ids, resized
seeds, cues, CRF colours and kept classes must be identical; argmax maps may differ only where the float64
run's top-2 margin is within twice the bound of the scores they decide on.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from ..clip import load_clip
from ..config import Config, CRFConfig, InferConfig, LossConfig
from ..infer import crf_inputs, finish_label_map, multiscale_probs, sliding_logits, view_probs
from ..losses import weakclip_losses
from ..model import WeakCLIP, build_model, cosine_score_map
from ..released import convert_state_dict, released_config
from . import FP64_FACTOR, RTOL, ParityReport, register_checker, top2_margin

CRF_RTOL = 1e-4
# Integer outputs that no float decision makes; argmax maps with the scores (and their rtol) that decide them.
EXACT = ("normalize", "text.token_ids", "loss.seed_small", "loss.cues", "loss.crf_image", "infer.aug_keys")
DECIDED = {"infer.aug_pred": ("infer.aug_probs", RTOL), "own_views.cv2.aug_pred": ("own_views.cv2.aug_probs", RTOL),
           "crf_post.label": ("crf_post.q", CRF_RTOL)}
MEASURED = ("own_views.torch.aug_probs", "own_views.torch.aug_pred")  # reported, not judged: not the released resize


def build_released_model(fixture: Path, config: dict) -> tuple[WeakCLIP, Config]:
    """The fixture's official state dict converted into our model (released mode, eval)."""
    m = config["model"]
    state = load_file(str(fixture / "state_dict.safetensors"))
    conversion = convert_state_dict(
        state, str(fixture / "state_dict.safetensors"), vision_heads=m["backbone"]["heads"],
        text_heads=m["text_encoder"]["transformer_heads"], coattn_heads=m["context_decoder"]["transformer_heads"])
    cfg = released_config(Config(), conversion, m["class_names"])
    model = build_model(cfg.model, cfg.data.class_names, load_clip(cfg.model.clip, from_checkpoint=True))
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


def _network_outputs(model: WeakCLIP, inputs: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every network intermediate the fixture records, each from the module that produces it, and the
    model's own fast forward (fused lateral deconvolutions, shared head upsampling, shared text prefix)."""
    img = inputs["img"].to(dtype)
    out: dict[str, Tensor] = {"normalize": model.normalize(inputs["image_uint8"].permute(0, 3, 1, 2)),
                              "text.token_ids": model.text.tokens}
    with torch.no_grad():
        feats = model.visual(img)
        levels = model.adapter(feats.taps)
        out.update({f"backbone.tap.{i}": t for i, t in enumerate(feats.taps)})
        out.update({f"backbone.adapter.{i}": x for i, x in enumerate(levels)})
        out["backbone.global_embedding"], out["backbone.dense_embedding"] = feats.global_embedding, feats.dense
        text = model.text()[None]
        out["text.features"] = text
        if model.text.share_prefix:  # the fast path above; the plain causal pass over all 13 tokens too
            model.text.share_prefix = False
            out["text.features_full_pass"] = model.text()[None]
            model.text.share_prefix = True
        co = model.co_attention
        tokens = co.visual_context(feats.dense, feats.global_embedding)
        text = text.expand(feats.dense.shape[0], -1, -1)
        out["coattn.visual_context"] = tokens
        out["coattn.text_diff"], out["coattn.visual_diff"] = co.deltas(text, tokens)
        text_after, dense_after = co(text, feats.dense, feats.global_embedding)
        out["coattn.text_after"], out["coattn.dense_after"] = text_after, dense_after
        score = cosine_score_map(text_after, dense_after)
        out["score_map"] = score
        out.update({f"neck.in.{i}": x for i, x in enumerate(model.neck.inputs(levels, score))})
        neck_out = model.neck(levels, score)  # concatenates inside, by split lateral weights
        out.update({f"neck.out.{i}": x for i, x in enumerate(neck_out)})
        features = model.head.features(neck_out)
        out["head.features"], out["head.logits"] = features, model.head.classifier(features)
        fast = model.forward_normalized(img)
        out["forward.logits"], out["forward.score_map"] = fast["logits"], fast["score_map"]
    return out


def _loss_config(config: dict) -> LossConfig:
    lc = config["loss"]
    c = lc["crf_train"]
    crf = CRFConfig(c["gaussian_sxy"], c["gaussian_compat"], c["bilateral_sxy"], c["bilateral_srgb"],
                    c["bilateral_compat"], c["t"])
    return LossConfig(aux_weight=lc["identity_loss_weight"], tau=config["model"].get("tau", 0.07),
                      size=lc["feature_size"][0], crf_backend="pydensecrf", crf=crf)


def _loss_outputs(model: WeakCLIP, config: dict, inputs: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    """The training losses with the loss function's own intermediates, and the gradients of the total."""
    lcfg = _loss_config(config)
    out = model.forward_normalized(inputs["img"].to(dtype))
    logits, score = out["logits"], out["score_map"]
    logits.retain_grad()
    score.retain_grad()
    images = inputs["image_uint8"].permute(0, 3, 1, 2)
    trace: dict[str, Tensor] = {}
    losses = weakclip_losses(logits, score, inputs["seed"], images, lcfg, released=True, trace=trace)
    q = trace["crf_q"].double().clamp_min(1e-4)
    res = {"loss.logits_small": trace["logits_small"], "loss.seed_small": trace["seeds_small"][:, None],
           "loss.cues": trace["cues"], "loss.probs": trace["probs"],
           "loss.crf_image": trace["crf_image"].permute(0, 2, 3, 1), "loss.crf_log_q": (q / q.sum(1, keepdim=True)).log(),
           "loss.seeding": losses["seed"], "loss.boundary": losses["boundary"],
           "loss.identity_ce": lcfg.aux_weight * losses["aux"], "loss.identity_acc_seg": losses["aux_accuracy"],
           "loss.total": losses["total"]}
    losses["total"].backward()
    res.update({"grad.head.logits": logits.grad, "grad.score_map": score.grad,
                "grad.contexts": model.text.ctx.grad[None], "grad.gamma": model.co_attention.alpha.grad,
                "grad.beta": model.co_attention.beta.grad,
                "grad.decode_head.conv_seg.weight": model.head.classifier.weight.grad,
                "grad.decode_head.scale_heads.3.0.conv.weight": model.head.branches[3][0][0].weight.grad})
    model.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in res.items()}


def _inference_outputs(model: WeakCLIP, config: dict, inputs: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    """Test time: the first window, single-scale sliding logits, multi-scale flip probabilities from the
    recorded views, then the production CRF path of pseudo masks (:func:`crf_inputs`, the worker's
    :func:`finish_label_map`); and our own view resizing of the stored uint8 image."""
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

    out: dict[str, Tensor] = {}
    with torch.no_grad():
        view = inputs[views[single]][0].to(dtype)
        out["infer.window0_logits"] = slide(view[:, : icfg.crop_size, : icfg.crop_size])
        out["infer.slide_logits"] = F.interpolate(slide(view), size=size, mode="bilinear", align_corners=False)
        probs = sum(view_probs(predict, inputs[v].to(dtype), [f], size, icfg.crop_size, icfg.stride)[0]
                    for v, f in zip(views, flips)) / len(views)  # in the released order, view by view
    out["infer.aug_probs"], out["infer.aug_pred"] = probs, probs.argmax(0)
    kept, keys, unknown = crf_inputs(probs, None)  # released: no label filter
    out["infer.aug_keys"] = torch.tensor(keys)
    trace: dict = {}
    label = finish_label_map(kept.float().numpy(), keys, image, unknown.numpy(), icfg.crf_params, trace=trace)
    out["crf_post.q"], out["crf_post.label"] = torch.from_numpy(trace["crf_q"]), torch.from_numpy(label)

    def predict_uint8(x: Tensor) -> Tensor:
        return model(x)["logits"]

    for method in ("cv2", "torch"):
        own = multiscale_probs(predict_uint8, image, InferConfig(**{**icfg.__dict__, "view_resize": method}),
                               torch.device("cpu"))
        out[f"own_views.{method}.aug_probs"], out[f"own_views.{method}.aug_pred"] = own, own.argmax(0)
    return out


def fixture_outputs(fixture: Path, config: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    """Our value of every recorded tensor (and of the extra checks), by name, with the model in ``dtype``."""
    torch.manual_seed(0)
    inputs = load_file(str(fixture / "inputs.safetensors"))
    model, _ = build_released_model(fixture, config)
    model = model.to(dtype)
    return {**_network_outputs(model, inputs, dtype), **_loss_outputs(model, config, inputs, dtype),
            **_inference_outputs(model, config, inputs, dtype)}


def _reference(name: str, ref: dict[str, Tensor]) -> Tensor:
    """The recorded tensor a comparison is judged against (extra checks reuse the recorded outputs)."""
    if name in ref:
        return ref[name]
    return ref[{"text.features_full_pass": "text.features", "forward.logits": "head.logits",
                "forward.score_map": "score_map"}.get(name, name.replace("own_views.cv2.", "infer."))]


@register_checker("weakclip")
def check_weakclip(fixture: Path, config: dict, report: ParityReport) -> None:
    """Every comparison the fixture supports (see the module docstring)."""
    # The recorded outputs, and the recorded model input that our normalisation of the uint8 image must give.
    ref = {**load_file(str(fixture / "outputs.safetensors")), "normalize": load_file(str(fixture / "inputs.safetensors"))["img"]}
    ours, ours64 = fixture_outputs(fixture, config, torch.float32), fixture_outputs(fixture, config, torch.float64)
    for name, value in ours.items():
        if name in MEASURED:
            report.measure(name, value, ref[name.replace("own_views.torch.", "infer.")], as_labels="pred" in name)
        elif name in EXACT:
            report.equal(name, value, _reference(name, ref))
        elif name in DECIDED:
            scores, rtol = DECIDED[name]
            scale = float(_reference(scores, ref).abs().max())
            bound = 2 * (2 * rtol * scale + FP64_FACTOR * float((ours[scores] - ours64[scores]).abs().max()))
            report.labels(name, value, _reference(name, ref), top2_margin(ours64[scores].double()), bound)
        else:
            rtol = CRF_RTOL if name in ("crf_post.q", "loss.crf_log_q") else RTOL
            report.close(name, value, _reference(name, ref), fp64=ours64[name], rtol=rtol)

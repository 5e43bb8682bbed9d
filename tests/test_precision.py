"""Reduced precision: frozen CLIP weights held in the compute dtype (cast once, never per call), bf16 only
where the hardware has it, training precision, and the window batch per device."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import weakclip.precision as precision
from weakclip.clip import cast_frozen_, load_clip
from weakclip.clip_es import ClipES
from weakclip.config import VOC_CLASSES, Config, InferConfig, ModelConfig, SeedsConfig
from weakclip.engine import resolve_amp
from weakclip.errors import WeakclipError
from weakclip.infer import CPU_WINDOWS, refiner_predictor, window_batch_size
from weakclip.model import build_model
from weakclip.train import training_precision

CPU = torch.device("cpu")


class CastRecorder(TorchDispatchMode):
    """Records every dtype copy (aten._to_copy) whose source is one of the watched tensors."""

    def __init__(self, watched: list[torch.Tensor]):
        super().__init__()
        self.watched = {t.data_ptr() for t in watched}
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.watched:
            self.casts += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tiny_model(tiny_clip_cfg):
    torch.manual_seed(0)
    return build_model(ModelConfig(clip=tiny_clip_cfg, decoder_channels=32), list(VOC_CLASSES))


def frozen_weights(model) -> list[torch.Tensor]:
    return [p for p in [*model.visual.parameters(), *model.text.parameters()] if not p.requires_grad]


def test_cast_frozen_casts_frozen_weights_and_float_buffers_only():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    net[0].requires_grad_(False)
    cast_frozen_(net, torch.bfloat16)
    assert net[0].weight.dtype == net[0].bias.dtype == torch.bfloat16
    assert net[2].weight.dtype == torch.float32 and net[2].weight.requires_grad  # trainable: untouched
    assert net[1].running_mean.dtype == torch.bfloat16  # floating buffer
    assert net[1].num_batches_tracked.dtype == torch.int64  # integer buffer: untouched


def test_bf16_holds_the_towers_in_bf16_and_the_trainable_modules_in_fp32(tiny_model):
    predict = refiner_predictor(tiny_model, CPU, "bf16")
    assert tiny_model.compute_dtype == torch.bfloat16
    assert {p.dtype for p in frozen_weights(tiny_model)} == {torch.bfloat16}
    assert tiny_model.text.attn_mask.dtype == torch.bfloat16 and tiny_model.text.tokens.dtype == torch.int64
    trainable = tiny_model.trainable_parameters()
    assert tiny_model.text.ctx.dtype == torch.float32
    assert trainable and {p.dtype for p in trainable} == {torch.float32}
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert predict(images).shape == (2, len(VOC_CLASSES), 16, 16)


def test_no_frozen_weight_is_cast_per_call_and_no_autocast_covers_the_towers(tiny_model):
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    # Control: the fp32 towers under bf16 autocast (the former bf16 path) cast their weights at every call.
    fp32_weights = frozen_weights(tiny_model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), CastRecorder(fp32_weights) as rec:
        tiny_model.visual(tiny_model.normalize(images))
    assert rec.casts > 0

    predict = refiner_predictor(tiny_model, CPU, "bf16")
    seen = []
    for tower in (tiny_model.visual, tiny_model.text):
        tower.register_forward_pre_hook(lambda m, a: seen.append(torch.is_autocast_enabled("cpu")))
    with torch.no_grad(), CastRecorder(frozen_weights(tiny_model)) as rec:
        predict(images)
        predict(images)
    assert rec.casts == 0
    assert seen == [False, False, False]  # text once (reused), the image tower per call: never under autocast


def test_bf16_predictions_follow_fp32(tiny_model):
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    with torch.no_grad():
        fp32 = refiner_predictor(tiny_model, CPU, "fp32")(images)
        bf16 = refiner_predictor(tiny_model, CPU, "bf16")(images).float()
    assert not torch.equal(fp32, bf16)
    # bf16 keeps 8 significant bits: errors of a few percent of the logits' range, the same argmax almost
    # everywhere.
    assert (fp32 - bf16).abs().max() < 0.05 * fp32.abs().max()
    assert (fp32.argmax(1) == bf16.argmax(1)).float().mean() > 0.95


def test_predictor_precision_defaults_to_the_model_and_bad_names_are_one_line(tiny_model):
    tiny_model.set_compute_dtype(torch.bfloat16)
    refiner_predictor(tiny_model, CPU)
    assert tiny_model.visual.visual.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(WeakclipError, match="infer.precision: expected fp32 or bf16, got 'fp8'"):
        refiner_predictor(tiny_model, CPU, "fp8")


def test_training_step_under_amp_reaches_the_prompts_through_the_bf16_text_tower(tiny_model):
    tiny_model.set_compute_dtype(torch.bfloat16).train()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16), CastRecorder(frozen_weights(tiny_model)) as rec:
        out = tiny_model(images)
        loss = out["logits"].float().logsumexp(1).mean() + out["score_map"].float().mean()
    loss.backward()
    assert rec.casts == 0
    assert tiny_model.text.ctx.grad is not None and tiny_model.text.ctx.grad.abs().sum() > 0
    assert tiny_model.head.classifier.weight.grad.dtype == torch.float32
    assert all(p.grad is None for p in frozen_weights(tiny_model))


def test_checkpointed_clip_weights_are_float32_whatever_the_compute_dtype(tiny_clip_cfg):
    import dataclasses

    clip = dataclasses.replace(tiny_clip_cfg, in_checkpoint=True)
    cfg = ModelConfig(clip=clip, decoder_channels=32)
    model = build_model(cfg, ["background", "cat"], load_clip(clip, from_checkpoint=True))
    model.set_compute_dtype(torch.bfloat16)
    state = model.weakclip_state_dict()
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    assert torch.equal(state["visual.visual.conv1.weight"], model.visual.visual.conv1.weight.float())


def test_native_bf16_follows_the_cpu_flags_and_warns_once_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(precision, "_cpu_flags", lambda: frozenset({"avx2"}))
    precision.warn_if_slow.cache_clear()
    assert precision.native(torch.float32, CPU)
    assert not precision.native(torch.bfloat16, CPU)
    precision.warn_if_slow(torch.bfloat16, CPU, "infer.precision")
    precision.warn_if_slow(torch.bfloat16, CPU, "infer.precision")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "slower than fp32" in err and "--set infer.precision=fp32" in err
    for flag in ("amx_bf16", "avx512_bf16"):
        monkeypatch.setattr(precision, "_cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        assert precision.native(torch.bfloat16, CPU)
    precision.warn_if_slow.cache_clear()


def test_train_amp_auto_is_fp32_on_cpus_and_in_released_mode(monkeypatch):
    assert resolve_amp("auto", CPU) == "fp32" and resolve_amp("fp32", CPU) == "fp32"
    assert resolve_amp("bf16", CPU) == "bf16"
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    gpu = torch.device("cuda", 0)
    assert resolve_amp("auto", gpu) == "bf16"
    cfg = Config()
    assert training_precision(cfg, gpu) == "bf16"
    cfg.model.released = True
    assert training_precision(cfg, gpu) == "fp32"  # as the released code trains
    cfg.train.amp = "bf16"
    assert training_precision(cfg, gpu) == "bf16"  # an explicit choice stands
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_amp("auto", gpu) == "fp32"  # a GPU without native bf16 (before Ampere)
    with pytest.raises(WeakclipError, match="train.amp: expected auto, bf16 or fp32, got 'fp16'"):
        resolve_amp("fp16", CPU)


def test_window_batch_follows_the_device_and_an_explicit_size_wins(monkeypatch):
    assert InferConfig().batch_size is None
    assert window_batch_size(InferConfig(), CPU) == CPU_WINDOWS == 2
    assert window_batch_size(InferConfig(batch_size=8), CPU) == 8
    gib = 1 << 30
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 * gib)
    for free, expected in ((70 * gib, 16), (8 * gib, 5), (0, 1)):  # (free + 2 GiB cached) / 2 per 1 GiB window
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None, free=free: (free, 80 * gib))
        assert window_batch_size(InferConfig(), gpu) == expected
    # 256-pixel windows take a quarter of the memory of 512 ones.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    assert window_batch_size(InferConfig(crop_size=256), gpu) == 8
    assert window_batch_size(InferConfig(batch_size=3), gpu) == 3


def test_seeds_cast_the_clip_model_once_and_run_without_autocast(tiny_clip_cfg):
    model = load_clip(tiny_clip_cfg)
    names = ["background", "cat", "dog"]
    image = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    method = ClipES(model, names, SeedsConfig(crf=False, precision="bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    # The position table is resized in float32 on purpose (a 1 + 14 x 14 row table, not a weight matrix).
    weights = [p for n, p in model.named_parameters() if n != "visual.positional_embedding"]
    with CastRecorder(weights) as rec:
        cams = method.cams(image, [1, 2])
    assert rec.casts == 0 and cams.shape == (2, 48, 64) and np.isfinite(cams).all()


def test_train_runs_the_loop_at_the_resolved_precision_with_the_towers_cast(monkeypatch, tmp_path,
                                                                           tiny_clip_cfg):
    import weakclip.train as train_module
    from weakclip.distributed import DistInfo

    seen = {}
    monkeypatch.setattr(train_module, "train_dataset", lambda cfg, progress=True, model_cfg=None: None)
    monkeypatch.setattr(train_module, "train_loop",
                        lambda model, dataset, loss, optimizer, lr, spec, *args, **kwargs: seen.update(
                            spec=spec, dtype=model.visual.visual.conv1.weight.dtype, ctx=model.text.ctx.dtype))
    info = DistInfo(0, 1, 0, CPU)
    cfg = Config()
    cfg.model.clip, cfg.model.decoder_channels, cfg.train.amp = tiny_clip_cfg, 32, "bf16"
    train_module.train(cfg, tmp_path / "bf16", info=info)
    assert seen == {"spec": seen["spec"], "dtype": torch.bfloat16, "ctx": torch.float32}
    assert seen["spec"].amp == "bf16"
    cfg.train.amp = "auto"  # on a CPU: fp32
    train_module.train(cfg, tmp_path / "auto", info=info)
    assert seen["spec"].amp == "fp32" and seen["dtype"] == torch.float32

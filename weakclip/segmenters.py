"""Fully supervised segmenters for retraining on pseudo masks (paper Sec. 3.4), behind a small registry.

``build_segmenter(cfg.retrain, num_classes)`` returns a :class:`Segmenter`: its forward maps (B, 3, H, W)
images, already normalised with the ImageNet mean/std, to (B, K, H, W) logits at the input resolution, and
``param_groups(lr)`` gives SGD groups with the pretrained part at lr and the new head at 10x lr.

Registered archs and how ``retrain.encoder`` selects their encoder: ``null`` (the config default) picks
the arch's default; any other value is used as given.

============================  ===============  ==========================================================
arch                          default encoder  other encoders
============================  ===============  ==========================================================
``deeplabv3plus``             resnet101        any smp encoder name (``resnet18`` for CPU smoke runs)
``segformer``                 mit_b2           any smp encoder; ``mit_b0`` .. ``mit_b5`` are SegFormer's own
``deeplab-largefov``          resnet38         none: the paper's DeepLab-v1 LargeFOV on ResNet-38
============================  ===============  ==========================================================

Pretrained weights:

- ``retrain.backbone_file`` (any arch): a local state dict (``.safetensors`` or a ``torch.save`` file) for the
  backbone/encoder; it replaces ``encoder_weights``. Extra keys (an ImageNet classifier) are ignored.
  ResNet-38's parameter names follow the ResNet-38 of PSA, SEAM and MCTformer (``conv1a.weight``,
  ``b2.bn_branch2a.weight``, ..., ``bn7.running_var``), so their converted MXNet ImageNet weights
  (``ilsvrc-cls_rna-a1_cls1000_ep-0001``) should load as they are.
- ``retrain.encoder_weights`` (smp archs): a weights tag (``imagenet``, ...) that smp fetches by name from the
  Hugging Face hub. Without a network this fails in one line, before the model is built. ResNet-38 weights
  have no name to fetch by: use ``backbone_file`` or ``encoder_weights: null``.

The smallest configuration, used by the ``voc-sample-cpu`` retrain config for CPU smoke runs:
``arch: deeplabv3plus, encoder: resnet18, encoder_weights: null`` (12.3M parameters).
"""

from __future__ import annotations

import difflib
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RetrainConfig
from .errors import WeakclipError

HEAD_LR_MULT = 10.0  # DeepLab convention: the randomly initialised head learns 10x faster than the backbone

SegmenterBuilder = Callable[[RetrainConfig, int], "Segmenter"]
_REGISTRY: dict[str, SegmenterBuilder] = {}


def register_segmenter(name: str) -> Callable[[SegmenterBuilder], SegmenterBuilder]:
    """Decorator: register ``builder(cfg, num_classes) -> Segmenter`` under ``name`` (the ``retrain.arch`` value)."""

    def add(builder: SegmenterBuilder) -> SegmenterBuilder:
        if name in _REGISTRY:
            raise ValueError(f"segmenter '{name}' is already registered")
        _REGISTRY[name] = builder
        return builder

    return add


def list_segmenters() -> list[str]:
    """Names accepted by ``retrain.arch``, sorted."""
    return sorted(_REGISTRY)


def build_segmenter(cfg: RetrainConfig, num_classes: int) -> Segmenter:
    """Build the ``cfg.arch`` segmenter for ``num_classes`` classes (background included), with its weights."""
    if cfg.arch not in _REGISTRY:
        raise WeakclipError(f"retrain.arch: unknown segmenter '{cfg.arch}' (choose from {', '.join(list_segmenters())})")
    return _REGISTRY[cfg.arch](cfg, num_classes)


class Segmenter(nn.Module):
    """Base class: (B, 3, H, W) ImageNet-normalised images -> (B, K, H, W) logits.

    Subclasses say which submodule is the pretrained part; every other parameter belongs to the new head.
    """

    def pretrained(self) -> nn.Module:
        """The backbone/encoder that ``backbone_file`` or ``encoder_weights`` initialise."""
        raise NotImplementedError

    def param_groups(self, lr: float) -> list[dict]:
        """SGD groups over the trainable parameters: pretrained part at ``lr``, head at ``HEAD_LR_MULT * lr``.

        Each group has ``params``, ``lr``, ``lr_mult`` (the engine sets ``lr = scheduled lr * lr_mult``) and
        ``name``.
        """
        backbone = [p for p in self.pretrained().parameters() if p.requires_grad]
        in_backbone = {id(p) for p in backbone}
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in in_backbone]
        return [
            {"name": "backbone", "params": backbone, "lr": lr, "lr_mult": 1.0},
            {"name": "head", "params": head, "lr": lr * HEAD_LR_MULT, "lr_mult": HEAD_LR_MULT},
        ]


def _pick_encoder(cfg: RetrainConfig, arch_default: str) -> str:
    """``cfg.encoder``, or the arch's default when it is null."""
    return cfg.encoder or arch_default


def read_backbone_file(path: str) -> dict[str, Tensor]:
    """Read ``retrain.backbone_file``: a state dict saved as ``.safetensors`` or with ``torch.save``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise WeakclipError(f"{file}: retrain.backbone_file not found")
    try:
        if file.suffix == ".safetensors":
            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeakclipError(f"{file}: cannot read as a state dict ({type(exc).__name__}: {first_line})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeakclipError(f"{file}: expected a state dict (parameter name -> tensor)")
    return dict(state)


def load_backbone_state(module: nn.Module, state: Mapping[str, Tensor], file: str) -> None:
    """Copy ``state`` (read from ``file``) into ``module``.

    Every parameter and buffer of ``module`` must be in ``state`` with its shape (BatchNorm's
    ``num_batches_tracked`` may be absent); keys that ``module`` lacks, such as an ImageNet classifier, are
    ignored.
    """
    wanted = module.state_dict()
    for key, tensor in wanted.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):
                continue
            example = next(iter(state), "none")
            raise WeakclipError(f"{file}: key '{key}' missing (the file's keys look like '{example}')")
        if state[key].shape != tensor.shape:
            raise WeakclipError(
                f"{file}: key '{key}' has shape {tuple(state[key].shape)} in the file, "
                f"the backbone expects {tuple(tensor.shape)}"
            )
    module.load_state_dict({k: state[k] for k in wanted if k in state}, strict=False)


# --------------------------------------------------------------------------- smp archs


def _smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        raise WeakclipError(
            "retrain.arch: this segmenter needs segmentation-models-pytorch (pip install 'weakclip[retrain]')"
        ) from None
    return smp


def _check_encoder_weights(encoder: str, weights: str) -> None:
    """Fail fast, in one line, when smp could not get ``weights`` for ``encoder`` from the Hugging Face hub.

    smp downloads ``config.json`` and ``model.safetensors`` from a pinned hub revision. When they are not in
    the local cache, one HEAD request without retries decides (under HF_HUB_OFFLINE it fails at once): without
    a network, smp's own download would retry for about a minute before giving up.
    """
    import huggingface_hub

    settings = _smp().encoders.encoders[encoder]["pretrained_settings"]
    if weights not in settings:
        raise WeakclipError(
            f"retrain.encoder_weights: no '{weights}' weights for {encoder} (available: {', '.join(settings)})"
        )
    repo, revision = settings[weights]["repo_id"], settings[weights]["revision"]
    files = ("config.json", "model.safetensors")
    if all(isinstance(huggingface_hub.try_to_load_from_cache(repo, f, revision=revision), str) for f in files):
        return
    hint = "use --set retrain.encoder_weights=null for random init, or --set retrain.backbone_file=PATH"
    try:
        url = huggingface_hub.hf_hub_url(repo, files[1], revision=revision)
        huggingface_hub.get_hf_file_metadata(url, timeout=10)
    except Exception as exc:  # noqa: BLE001 - the hub's transport errors differ between its versions
        raise WeakclipError(
            f"retrain.encoder_weights: cannot fetch '{weights}' weights for {encoder} ({repo}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}); {hint}"
        ) from None


class SmpSegmenter(Segmenter):
    """An smp encoder-decoder; inputs are zero-padded (the ImageNet mean after normalisation) on the bottom
    and right to a multiple of the encoder's stride, which smp requires, and the logits cropped back."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def pretrained(self) -> nn.Module:
        return self.model.encoder

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> logits (B, K, H, W)."""
        h, w = images.shape[-2:]
        stride = self.model.encoder.output_stride
        padded = F.pad(images, (0, -w % stride, 0, -h % stride))
        return self.model(padded)[..., :h, :w]


def _build_smp(cfg: RetrainConfig, num_classes: int, model_cls: str, default_encoder: str) -> SmpSegmenter:
    smp = _smp()
    encoder = _pick_encoder(cfg, default_encoder)
    names = smp.encoders.get_encoder_names()
    if encoder not in names:
        close = difflib.get_close_matches(encoder, names, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else " (see segmentation_models_pytorch.encoders)"
        raise WeakclipError(f"retrain.encoder: unknown encoder '{encoder}' for {cfg.arch}{hint}")
    state = read_backbone_file(cfg.backbone_file) if cfg.backbone_file else None
    weights = None if state is not None else cfg.encoder_weights
    if weights is not None:
        _check_encoder_weights(encoder, weights)
    model = getattr(smp, model_cls)(encoder_name=encoder, encoder_weights=weights, classes=num_classes)
    segmenter = SmpSegmenter(model)
    if state is not None:
        load_backbone_state(segmenter.pretrained(), state, cfg.backbone_file)
    return segmenter


@register_segmenter("deeplabv3plus")
def deeplabv3plus(cfg: RetrainConfig, num_classes: int) -> SmpSegmenter:
    """smp DeepLabV3+ (encoder output stride 16, ASPP + 1/4 decoder), default encoder ResNet-101."""
    return _build_smp(cfg, num_classes, "DeepLabV3Plus", "resnet101")


@register_segmenter("segformer")
def segformer(cfg: RetrainConfig, num_classes: int) -> SmpSegmenter:
    """smp SegFormer (all-MLP decoder at 1/4), default encoder MiT-B2: the transformer option."""
    return _build_smp(cfg, num_classes, "Segformer", "mit_b2")


# --------------------------------------------------------------------------- ResNet-38 + LargeFOV


class WideBlock(nn.Module):
    """Pre-activation residual block of two 3x3 convs (in -> mid -> out): BN-ReLU before each conv.

    The shortcut is the identity when shapes agree, else a 1x1 (strided) conv of the pre-activated input.
    """

    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1, first_dilation: int = 1, dilation: int = 1):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, mid, 3, stride, first_dilation, first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid)
        self.conv_branch2b1 = nn.Conv2d(mid, cout, 3, 1, dilation, dilation, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin, stride) != (cout, 1) else None

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, H, W) -> (B, cout, H/stride, W/stride)."""
        act = F.relu(self.bn_branch2a(x))
        shortcut = x if self.conv_branch1 is None else self.conv_branch1(act)
        out = self.conv_branch2a(act)
        out = self.conv_branch2b1(F.relu(self.bn_branch2b1(out)))
        return shortcut + out


class WideBottleneck(nn.Module):
    """Pre-activation bottleneck 1x1 (out/4) -> 3x3 dilated (out/2) -> 1x1 (out), spatial dropout before the
    last two convs, 1x1 conv shortcut of the pre-activated input."""

    def __init__(self, cin: int, cout: int, dilation: int, dropout: float):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, cout // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(cout // 4)
        self.conv_branch2b1 = nn.Conv2d(cout // 4, cout // 2, 3, 1, dilation, dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(cout // 2)
        self.conv_branch2b2 = nn.Conv2d(cout // 2, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.dropout = nn.Dropout2d(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, H, W) -> (B, cout, H, W)."""
        act = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(act)
        out = self.conv_branch2a(act)
        out = self.conv_branch2b1(self.dropout(F.relu(self.bn_branch2b1(out))))
        out = self.conv_branch2b2(self.dropout(F.relu(self.bn_branch2b2(out))))
        return shortcut + out


class ResNet38(nn.Module):
    """Wide ResNet-38 ("model A" of Wu, Shen and van den Hengel, "Wider or Deeper", 2019) at output stride 8.

    conv1a 3x3 (64) at full resolution, then stages of pre-activation blocks:
    b2 3 x [128, 128] /2, b3 3 x [256, 256] /2, b4 6 x [512, 512] /2,
    b5 3 x [512, 1024] dilation 2 (its first conv undilated), b6 bottleneck [512, 1024, 2048] dilation 4
    (dropout 0.3), b7 bottleneck [1024, 2048, 4096] dilation 4 (dropout 0.5), then BN + ReLU.
    1 + 2 * 15 + 3 * 2 = 37 weight layers (the 38th is the ImageNet classifier, not kept here).
    """

    out_channels = 4096
    output_stride = 8

    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.b2 = WideBlock(64, 128, 128, stride=2)
        self.b2_1 = WideBlock(128, 128, 128)
        self.b2_2 = WideBlock(128, 128, 128)
        self.b3 = WideBlock(128, 256, 256, stride=2)
        self.b3_1 = WideBlock(256, 256, 256)
        self.b3_2 = WideBlock(256, 256, 256)
        self.b4 = WideBlock(256, 512, 512, stride=2)
        for i in range(1, 6):
            self.add_module(f"b4_{i}", WideBlock(512, 512, 512))
        self.b5 = WideBlock(512, 512, 1024, first_dilation=1, dilation=2)
        self.b5_1 = WideBlock(1024, 512, 1024, first_dilation=2, dilation=2)
        self.b5_2 = WideBlock(1024, 512, 1024, first_dilation=2, dilation=2)
        self.b6 = WideBottleneck(1024, 2048, dilation=4, dropout=0.3)
        self.b7 = WideBottleneck(2048, 4096, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(4096)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 4096, ceil(H/8), ceil(W/8))."""
        for name, block in self.named_children():  # children run in the order __init__ registers them
            if name != "bn7":
                x = block(x)
        return F.relu(self.bn7(x))


class LargeFOVHead(nn.Module):
    """DeepLab-v1 LargeFOV: 3x3 conv dilation 12 (1024) - ReLU - dropout - 1x1 (1024) - ReLU - dropout - 1x1 (K)."""

    def __init__(self, cin: int, num_classes: int, width: int = 1024, dropout: float = 0.5):
        super().__init__()
        self.fc6 = nn.Conv2d(cin, width, 3, padding=12, dilation=12)
        self.fc7 = nn.Conv2d(width, width, 1)
        self.fc8 = nn.Conv2d(width, num_classes, 1)
        self.dropout = nn.Dropout2d(dropout)
        for conv in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        # Small classifier weights: the softmax starts near uniform instead of saturated.
        nn.init.normal_(self.fc8.weight, std=0.01)
        nn.init.zeros_(self.fc8.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, cin, h, w) -> (B, K, h, w)."""
        x = self.dropout(F.relu(self.fc6(x)))
        x = self.dropout(F.relu(self.fc7(x)))
        return self.fc8(x)


class DeepLabLargeFOV(Segmenter):
    """DeepLab-v1 LargeFOV on ResNet-38: the paper's retraining network (as MCTformer's)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.backbone = ResNet38()
        self.head = LargeFOVHead(ResNet38.out_channels, num_classes)

    def pretrained(self) -> nn.Module:
        return self.backbone

    def forward(self, images: Tensor) -> Tensor:
        """images (B, 3, H, W) -> logits (B, K, H, W), bilinearly upsampled from stride 8."""
        logits = self.head(self.backbone(images))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


@register_segmenter("deeplab-largefov")
def deeplab_largefov(cfg: RetrainConfig, num_classes: int) -> DeepLabLargeFOV:
    """DeepLab-v1 LargeFOV on ResNet-38; ImageNet weights only from ``cfg.backbone_file``."""
    if _pick_encoder(cfg, "resnet38") != "resnet38":
        raise WeakclipError(
            f"retrain.encoder: deeplab-largefov is built on resnet38 only, got '{cfg.encoder}' "
            "(use arch deeplabv3plus or segformer for other encoders)"
        )
    if not cfg.backbone_file and cfg.encoder_weights is not None:
        raise WeakclipError(
            f"retrain.encoder_weights: '{cfg.encoder_weights}' weights for ResNet-38 cannot be fetched by name; "
            "give a local state dict with --set retrain.backbone_file=PATH, "
            "or --set retrain.encoder_weights=null for random init"
        )
    state = read_backbone_file(cfg.backbone_file) if cfg.backbone_file else None
    segmenter = DeepLabLargeFOV(num_classes)
    if state is not None:
        load_backbone_state(segmenter.backbone, state, cfg.backbone_file)
    return segmenter

"""Segmenters for retraining: registry, shapes, parameter groups, ResNet-38 structure, weight loading.

No test fetches weights: the hub is offline (conftest) or its cache/probe is redirected to tmp_path.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from weakclip.config import RetrainConfig
from weakclip.errors import WeakclipError
from weakclip.segmenters import build_segmenter, list_segmenters

K = 5

# ResNet-38 parameters by hand. A pre-activation block [cin -> mid -> out] holds BN(cin) 2cin, 3x3 cin*mid*9,
# BN(mid) 2mid, 3x3 mid*out*9, plus a 1x1 shortcut cin*out when the shape changes; a bottleneck cin -> out
# holds BN(cin) 2cin, 1x1 cin*out/4, BN 2(out/4), 3x3 (out/4)(out/2)*9, BN 2(out/2), 1x1 (out/2)*out and
# the 1x1 shortcut cin*out.
#   conv1a      3*64*9                                                          =      1,728
#   b2          128 + 64*128*9 + 256 + 128*128*9 + 64*128                       =    229,760
#   b2_1, b2_2  2 * (256 + 128*128*9 + 256 + 128*128*9)                         =    590,848
#   b3          256 + 128*256*9 + 512 + 256*256*9 + 128*256                     =    918,272
#   b3_1, b3_2  2 * (512 + 256*256*9 + 512 + 256*256*9)                         =  2,361,344
#   b4          512 + 256*512*9 + 1024 + 512*512*9 + 256*512                    =  3,671,552
#   b4_1..b4_5  5 * (1024 + 512*512*9 + 1024 + 512*512*9)                       = 23,603,200
#   b5          1024 + 512*512*9 + 1024 + 512*1024*9 + 512*1024                 =  7,604,224
#   b5_1, b5_2  2 * (2048 + 1024*512*9 + 1024 + 512*1024*9)                     = 18,880,512
#   b6          2048 + 1024*512 + 1024 + 512*1024*9 + 2048 + 1024*2048 + 1024*2048 =  9,442,304
#   b7          4096 + 2048*1024 + 2048 + 1024*2048*9 + 4096 + 2048*4096 + 2048*4096 = 37,758,976
#   bn7         2*4096                                                          =      8,192
#   total                                                                         105,070,912
RESNET38_PARAMS = 105_070_912
# LargeFOV head: 4096*1024*9 + 1024 (fc6) + 1024*1024 + 1024 (fc7) + 1024*K + K (fc8).
LARGEFOV_HEAD_PARAMS = 37_749_760 + 1_049_600 + 1024 * K + K


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def small_cfg(arch: str, **kw) -> RetrainConfig:
    encoder = {"deeplabv3plus": "resnet18", "segformer": "mit_b0", "deeplab-largefov": "resnet38"}[arch]
    return RetrainConfig(**{"arch": arch, "encoder": encoder, "encoder_weights": None, **kw})


@pytest.fixture(scope="module")
def largefov():
    """The real DeepLab-LargeFOV / ResNet-38 (~144M parameters), built once, in eval mode."""
    torch.manual_seed(0)
    return build_segmenter(small_cfg("deeplab-largefov"), K).eval()


@pytest.fixture(scope="module")
def small_smp():
    torch.manual_seed(0)
    return {arch: build_segmenter(small_cfg(arch), K).eval() for arch in ("deeplabv3plus", "segformer")}


def test_registry_lists_the_three_archs():
    assert list_segmenters() == ["deeplab-largefov", "deeplabv3plus", "segformer"]


def test_unknown_arch_names_the_key():
    with pytest.raises(WeakclipError, match=r"^retrain\.arch: unknown segmenter 'unet'.*deeplabv3plus"):
        build_segmenter(RetrainConfig(arch="unet"), K)


def test_unknown_encoder_names_the_key():
    with pytest.raises(WeakclipError, match=r"^retrain\.encoder: unknown encoder 'resnet181'.*'resnet18'"):
        build_segmenter(small_cfg("deeplabv3plus", encoder="resnet181"), K)


@pytest.mark.parametrize("arch", ["deeplabv3plus", "segformer"])
@pytest.mark.parametrize("size", [(64, 64), (50, 70)])  # 50x70: not a multiple of the encoder stride
def test_smp_logits_at_input_resolution(small_smp, arch, size):
    with torch.no_grad():
        logits = small_smp[arch](torch.randn(1, 3, *size))
    assert logits.shape == (1, K, *size)
    assert torch.isfinite(logits).all()


def test_default_encoder_per_arch(monkeypatch):
    """The config default encoder means each arch's own default; other values are used as given."""
    import segmentation_models_pytorch as smp

    built = []
    monkeypatch.setattr(smp, "Segformer", lambda **kw: built.append(kw) or torch.nn.Identity())
    build_segmenter(RetrainConfig(arch="segformer", encoder_weights=None), K)
    build_segmenter(RetrainConfig(arch="segformer", encoder="mit_b0", encoder_weights=None), K)
    assert [kw["encoder_name"] for kw in built] == ["mit_b2", "mit_b0"]
    assert built[0]["classes"] == K


def test_largefov_rejects_other_encoders():
    with pytest.raises(WeakclipError, match=r"^retrain\.encoder: deeplab-largefov is built on resnet38 only"):
        build_segmenter(small_cfg("deeplab-largefov", encoder="resnet50"), K)


def test_largefov_shapes_and_output_stride_8(largefov):
    seen = {}
    hook = largefov.head.register_forward_hook(lambda mod, args, out: seen.update(feat=args[0], low=out))
    with torch.no_grad():
        logits = largefov(torch.randn(1, 3, 64, 64))
    hook.remove()
    assert seen["feat"].shape == (1, 4096, 8, 8)  # the LargeFOV head sees stride 8
    assert seen["low"].shape == (1, K, 8, 8)
    assert logits.shape == (1, K, 64, 64)
    assert torch.isfinite(logits).all()


def test_resnet38_parameter_count(largefov):
    assert count(largefov.backbone) == RESNET38_PARAMS
    assert count(largefov.head) == LARGEFOV_HEAD_PARAMS
    # 37 weight layers (conv1a + 2 per block in b2-b5 + 3 per bottleneck), shortcuts aside.
    convs = [n for n, m in largefov.backbone.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len([n for n in convs if not n.endswith("conv_branch1")]) == 37


def test_resnet38_dilations(largefov):
    net = largefov.backbone
    assert (net.b4.conv_branch2a.stride, net.b4_5.conv_branch2b1.dilation) == ((2, 2), (1, 1))
    assert (net.b5.conv_branch2a.dilation, net.b5.conv_branch2b1.dilation) == ((1, 1), (2, 2))
    assert net.b5_2.conv_branch2a.dilation == (2, 2)
    assert (net.b6.conv_branch2b1.dilation, net.b7.conv_branch2b1.dilation) == ((4, 4), (4, 4))
    assert (net.b6.dropout.p, net.b7.dropout.p) == (0.3, 0.5)


@pytest.mark.parametrize("arch", ["deeplabv3plus", "segformer", "deeplab-largefov"])
def test_param_groups_cover_each_parameter_once(small_smp, largefov, arch):
    model = largefov if arch == "deeplab-largefov" else small_smp[arch]
    groups = model.param_groups(0.01)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
    by_name = {g["name"]: g for g in groups}
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in model.pretrained().parameters()}
    assert (by_name["backbone"]["lr_mult"], by_name["head"]["lr_mult"]) == (1.0, 10.0)
    assert by_name["head"]["lr"] == pytest.approx(0.1)
    assert by_name["head"]["params"]  # the head is not empty


def test_param_groups_skip_frozen_parameters():
    model = build_segmenter(small_cfg("deeplabv3plus"), K)
    model.model.encoder.conv1.weight.requires_grad_(False)
    ids = {id(p) for g in model.param_groups(0.01) for p in g["params"]}
    assert id(model.model.encoder.conv1.weight) not in ids
    assert len(ids) == sum(p.requires_grad for p in model.parameters())


def test_resnet38_backbone_file_roundtrip(largefov, tmp_path):
    path = tmp_path / "resnet38.pth"
    torch.save(largefov.backbone.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so only the file can make the backbones agree
    loaded = build_segmenter(small_cfg("deeplab-largefov", backbone_file=str(path)), K).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.backbone(x), largefov.backbone(x), rtol=0, atol=0)
        assert not torch.equal(loaded.head.fc8.weight, largefov.head.fc8.weight)


def test_largefov_imagenet_weights_need_a_file():
    with pytest.raises(WeakclipError, match=r"^retrain\.encoder_weights: .*backbone_file=PATH.*encoder_weights=null"):
        build_segmenter(small_cfg("deeplab-largefov", encoder_weights="imagenet"), K)


def test_smp_backbone_file_safetensors_roundtrip(small_smp, tmp_path):
    reference = small_smp["deeplabv3plus"]
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in reference.pretrained().state_dict().items()}, path)
    torch.manual_seed(1)
    loaded = build_segmenter(small_cfg("deeplabv3plus", backbone_file=str(path), encoder_weights="imagenet"), K)
    loaded.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.pretrained()(x)[-1], reference.pretrained()(x)[-1], rtol=0, atol=0)


def test_backbone_file_wrong_shape_names_key_and_shapes(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"conv1a.weight": torch.zeros(64, 3, 5, 5)}, path)
    with pytest.raises(WeakclipError) as err:
        build_segmenter(small_cfg("deeplab-largefov", backbone_file=str(path)), K)
    message = str(err.value)
    assert message.startswith(f"{path}: key 'conv1a.weight' has shape (64, 3, 5, 5) in the file")
    assert message.endswith("expects (64, 3, 3, 3)") and "\n" not in message


def test_backbone_file_missing_key(tmp_path):
    """A whole-model state dict (keys prefixed 'encoder.') is not an encoder's."""
    path = tmp_path / "whole_model.pth"
    torch.save({"encoder.conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(WeakclipError, match=r"key 'conv1\.weight' missing .*'encoder\.conv1\.weight'"):
        build_segmenter(small_cfg("deeplabv3plus", backbone_file=str(path)), K)


@pytest.mark.parametrize("arch", ["deeplab-largefov", "deeplabv3plus"])
def test_backbone_file_not_found(tmp_path, arch):
    path = tmp_path / "nowhere.pth"
    with pytest.raises(WeakclipError, match=rf"^{path}: retrain\.backbone_file not found$"):
        build_segmenter(small_cfg(arch, backbone_file=str(path)), K)


@pytest.mark.parametrize("name, content", [("garbage.pth", b"not a pickle"), ("garbage.safetensors", b"xx")])
def test_backbone_file_unreadable(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(WeakclipError, match=r"cannot read as a state dict"):
        build_segmenter(small_cfg("deeplabv3plus", backbone_file=str(path)), K)


# ------------------------------------------------------------------ encoder weights fetched by name


@pytest.fixture
def empty_hub_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache in tmp_path, offline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_unfetchable_weights_offline(empty_hub_cache):
    with pytest.raises(WeakclipError) as err:
        build_segmenter(small_cfg("deeplabv3plus", encoder_weights="imagenet"), K)
    message = str(err.value)
    assert message.startswith("retrain.encoder_weights: cannot fetch 'imagenet' weights for resnet18")
    assert "--set retrain.encoder_weights=null" in message and "retrain.backbone_file" in message
    assert "OfflineModeIsEnabled" in message and "\n" not in message


def test_unfetchable_weights_no_network(empty_hub_cache, monkeypatch):
    """Online mode without a network: one probe without retries decides (here a stand-in that fails)."""
    import huggingface_hub
    from huggingface_hub import constants

    urls = []

    def unreachable(url, **kw):
        urls.append(url)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(WeakclipError, match=r"ConnectionError: \[Errno -2\].*encoder_weights=null"):
        build_segmenter(small_cfg("segformer", encoder_weights="imagenet"), K)
    assert len(urls) == 1 and "smp-hub/mit_b0.imagenet" in urls[0]


def test_unknown_weights_tag():
    with pytest.raises(WeakclipError, match=r"^retrain\.encoder_weights: no 'instagram' weights for resnet18 "):
        build_segmenter(small_cfg("deeplabv3plus", encoder_weights="instagram"), K)


def test_cached_weights_are_loaded_by_name(empty_hub_cache):
    """Weights already in the hub cache load offline, the way smp fetches them."""
    from segmentation_models_pytorch.encoders import encoders, get_encoder

    settings = encoders["resnet18"]["pretrained_settings"]["imagenet"]
    snapshot = empty_hub_cache / f"models--{settings['repo_id'].replace('/', '--')}" / "snapshots"
    snapshot = snapshot / settings["revision"]
    snapshot.mkdir(parents=True)
    torch.manual_seed(2)
    state = get_encoder("resnet18").state_dict()
    save_file(state, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps({"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    model = build_segmenter(small_cfg("deeplabv3plus", encoder_weights="imagenet"), K)
    torch.testing.assert_close(model.pretrained().state_dict()["conv1.weight"], state["conv1.weight"])

"""Inference at dataset scale: batched windows, the text side once, the bounded CRF queue, and label maps
sharded over torchrun ranks and --shard jobs into one folder, identical to one process, after a crash too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_data_root, sample_ids, write_tiny_config

from weakclip.cli import main
from weakclip.config import VOC_CLASSES, InferConfig, ModelConfig, load_config
from weakclip.data.datasets import list_samples, load_image
from weakclip.distributed import DistInfo, Shard
from weakclip.errors import WeakclipError
from weakclip.infer import label_filter, multiscale_probs, refiner_predictor
from weakclip.jobs import CRFPool, crf_worker_count, write_label_maps
from weakclip.model import build_model

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_model():
    from conftest import TINY_ARCH

    from weakclip.config import ClipConfig

    torch.manual_seed(0)
    cfg = ModelConfig(clip=ClipConfig(model="tiny", pretrained=None, arch=dict(TINY_ARCH)), decoder_channels=32)
    return build_model(cfg, list(VOC_CLASSES)).eval()


class _Recording:
    """A predictor that records the batch size of every call."""

    def __init__(self, predict):
        self.predict, self.batches = predict, []

    def __call__(self, x):
        self.batches.append(x.shape[0])
        return self.predict(x)


def test_batched_windows_equal_one_at_a_time(tiny_model, voc_sample):
    # Three scales of one real image give windows of three sizes; flips share theirs.
    image = load_image(voc_sample / "JPEGImages" / f"{sample_ids(voc_sample, 1)[0]}.jpg")
    icfg = InferConfig(short_side=64, scales=[0.5, 1.0, 1.5], flip=True, crop_size=64, stride=43)
    predict = refiner_predictor(tiny_model, torch.device("cpu"))
    one, batched = _Recording(predict), _Recording(predict)
    p1 = multiscale_probs(one, image, icfg, torch.device("cpu"), batch_size=1)
    p8 = multiscale_probs(batched, image, icfg, torch.device("cpu"), batch_size=8)
    assert set(one.batches) == {1} and sum(batched.batches) == len(one.batches)
    assert len(batched.batches) < len(one.batches) / 2 and max(batched.batches) == 8
    torch.testing.assert_close(p8, p1, atol=1e-5, rtol=1e-4)
    labels = [1, 15]
    keys1, unknown1 = label_filter(p1, labels)
    keys8, unknown8 = label_filter(p8, labels)
    assert keys1 == keys8 and torch.equal(unknown1, unknown8)
    assert torch.equal(p1[keys1].argmax(0), p8[keys8].argmax(0))
    assert torch.equal(p1.argmax(0), p8.argmax(0))


def test_text_side_runs_once_per_run(tiny_model, voc_sample, monkeypatch):
    calls = []
    text_forward = tiny_model.text.forward
    monkeypatch.setattr(tiny_model.text, "forward", lambda: calls.append(1) or text_forward())
    image = load_image(voc_sample / "JPEGImages" / f"{sample_ids(voc_sample, 1)[0]}.jpg")
    icfg = InferConfig(short_side=64, scales=[1.0, 1.5], flip=True, crop_size=64, stride=43, batch_size=2)
    recording = _Recording(refiner_predictor(tiny_model, torch.device("cpu")))
    for _ in range(2):  # two images
        multiscale_probs(recording, image, icfg, torch.device("cpu"))
    assert len(recording.batches) > 4 and len(calls) == 1
    # The cached embeddings give the plain forward's logits.
    x = torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(recording(x), tiny_model(x)["logits"])


def test_crf_queue_applies_back_pressure(tmp_path):
    from weakclip.config import CRFConfig

    rng = np.random.default_rng(0)
    pool = CRFPool(workers=1, capacity=2)
    submitted, finished = [], []
    try:
        for i in range(6):
            probs = rng.dirichlet([1, 1], size=(48, 64)).transpose(2, 0, 1).astype(np.float32)
            image = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            job = (f"im{i}", probs, [0, 5], image, np.zeros((48, 64), bool), tmp_path / f"im{i}.png",
                   CRFConfig(), 255, None)
            finished += pool.submit(job)
            submitted.append(f"im{i}")
            assert len(pool.pending) <= 2  # never more than the capacity in memory
        finished += list(pool.drain())
    finally:
        pool.close()
    assert finished == submitted  # every image once, in order
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{i}.png" for i in submitted)


def test_crf_workers_default_to_the_cores_of_the_process(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert crf_worker_count(InferConfig(crf_workers=None)) == max(1, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores))  # one process per core: one worker each
    assert crf_worker_count(InferConfig(crf_workers=None)) == 1
    assert crf_worker_count(InferConfig(crf_workers=3)) == 3


class _ColourPredictor:
    def __init__(self):
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 21, 1)

    def __call__(self, x):
        with torch.no_grad():
            return self.conv(x.float() / 64)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png")) if not p.name.startswith(".")}


def test_shards_fill_one_folder_without_touching_each_other(tmp_path, voc_sample):
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 5))
    cfg = load_config(str(write_tiny_config(tmp_path / "tiny.yaml", root)))
    samples = list_samples(cfg.data, need_seeds=False)
    write = lambda out, **kw: write_label_maps(_ColourPredictor(), samples, out, cfg.infer, CPU, {"ckpt": "a"},
                                               use_labels=True, crf_params=cfg.infer.crf_params, progress=False,
                                               **kw)
    assert write(tmp_path / "one")["missing"] == 0
    out = tmp_path / "sharded"
    first = write(out, shard=Shard(1, 2))
    assert first == {"output": str(out), "written": 2, "skipped": 0, "missing": 3, "other_class_pixels": 0}
    assert not (out / "summary.json").exists()  # the list is not done yet
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    second = write(out, shard=Shard(0, 2))
    assert second == {"output": str(out), "written": 3, "skipped": 0, "missing": 0, "other_class_pixels": 0}
    assert all((out / name).stat().st_mtime_ns == t for name, t in stamps.items())
    assert _pngs(out) == _pngs(tmp_path / "one") and len(_pngs(out)) == 5
    assert (out / "summary.json").is_file()
    # A rerun as three shards finds everything done; another checkpoint is refused, and with reset redoes
    # every image of its shard.
    assert [write(out, shard=Shard(i, 3))["written"] for i in range(3)] == [0, 0, 0]
    other = lambda **kw: write_label_maps(_ColourPredictor(), samples, out, cfg.infer, CPU, {"ckpt": "b"},
                                          use_labels=True, crf_params=cfg.infer.crf_params, progress=False,
                                          shard=Shard(0, 2), **kw)
    with pytest.raises(WeakclipError, match='ckpt: "a" -> "b"'):
        other()
    assert len(_pngs(out)) == 5
    assert other(reset=True)["written"] == 3 and len(_pngs(out)) == 3  # the other shard's stale maps are gone


# ------------------------------------------------------------------------------ the command, torchrun


@pytest.fixture(scope="module")
def launch_setup(tmp_path_factory, voc_sample):
    """A tiny checkpoint, 4 real images, and the one-process pseudo masks as the reference."""
    tmp = tmp_path_factory.mktemp("launch")
    root = make_data_root(tmp / "data", voc_sample, sample_ids(voc_sample, 4))
    config = write_tiny_config(tmp / "tiny.yaml", root, train={"iters": 1, "checkpoint_every": 1})
    assert main(["train", "--config", str(config), "--output", str(tmp / "run")]) == 0
    args = ["pseudo-masks", "--config", str(config), "--checkpoint", str(tmp / "run" / "model.safetensors")]
    assert main([*args, "--output", str(tmp / "one")]) == 0
    reference = _pngs(tmp / "one")
    assert len(reference) == 4
    return tmp, args, reference


def _torchrun(args: list[str], nproc: int, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "weakclip", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_one_process_torchrun_and_shards_write_identical_masks(launch_setup):
    tmp, args, reference = launch_setup
    proc = _torchrun([*args, "--output", str(tmp / "two")], 2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert _pngs(tmp / "two") == reference
    assert out.count("pseudo masks:") == 1  # rank 0 reports, once, after every rank is done
    assert (tmp / "two" / "summary.json").is_file()

    for i in (0, 1):
        assert main([*args, "--output", str(tmp / "shards"), "--shard", f"{i}/2"]) == 0
        assert (tmp / "shards" / "summary.json").exists() == (i == 1)
    assert _pngs(tmp / "shards") == reference


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_a_killed_rank_is_finished_by_a_rerun_with_another_process_count(launch_setup):
    tmp, args, reference = launch_setup
    out = tmp / "killed"
    proc = _torchrun([*args, "--output", str(out)], 2)
    deadline = time.monotonic() + 300
    while not _pngs(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    ranks = _children(proc.pid)
    assert ranks and proc.poll() is None, "the launch ended before a rank could be killed"
    os.kill(ranks[-1], signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    done = {name: (out / name).stat() for name in _pngs(out)}
    assert 1 <= len(done) < 4
    assert not (out / "summary.json").exists()

    assert main([*args, "--output", str(out)]) == 0  # one process now
    assert _pngs(out) == reference
    for name, before in done.items():  # finished maps were kept, not redone
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(out.glob(".weakclip-tmp.*"))  # no half-written file left, none taken for a result
    assert (out / "summary.json").is_file()

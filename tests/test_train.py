"""Training end to end on the real sample with a tiny CLIP: resume is exact, torchrun DDP, pre-flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_data_root, sample_ids, write_tiny_config
from safetensors.torch import load_file

from weakclip.cli import main


def _weakclip(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "weakclip", *args], capture_output=True, text=True, timeout=600,
                          check=False, **kw)


@pytest.fixture
def tiny_run(tmp_path, voc_sample):
    root = make_data_root(tmp_path / "data", voc_sample, sample_ids(voc_sample, 8))
    return write_tiny_config(tmp_path / "tiny.yaml", root)


def test_train_writes_weights_logs_and_config(tiny_run, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_run), "--output", str(out)]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("iter,loss/seed,loss/boundary,loss/aux,loss/total,loss/aux_accuracy,lr")
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    state = load_file(str(out / "model.safetensors"))
    assert "text.ctx" in state and not any(k.startswith("visual.") for k in state)


def test_resume_after_kill_gives_the_same_weights(tiny_run, tmp_path):
    settings = ["--set", "train.iters=12", "--set", "train.checkpoint_every=3", "--set", "train.keep_checkpoints=5"]
    straight = tmp_path / "straight"
    assert _weakclip("train", "--config", str(tiny_run), "--output", str(straight), *settings).returncode == 0

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "weakclip", "train", "--config", str(tiny_run), "--output",
                             str(run), *settings], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "iter_0000003.state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed = _weakclip("train", "--config", str(tiny_run), "--output", str(run), *settings, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    a, b = load_file(str(straight / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [r.split(",")[0] for r in rows] == [str(i) for i in range(1, 13)]


def test_rerun_without_resume_refuses_to_mix_runs(tiny_run, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_run), "--output", str(out)]) == 0
    assert main(["train", "--config", str(tiny_run), "--output", str(out)]) == 2
    assert "pass --resume or a new --output" in capsys.readouterr().err


def test_torchrun_two_processes_on_cpu(tiny_run, tmp_path):
    from weakclip.checkpoints import load_refiner
    from weakclip.config import load_config

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "weakclip", "train", "--config",
           str(tiny_run), "--output", str(out), "--set", "train.iters=2", "--set", "train.batch_size=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("*.safetensors"))
    assert ckpts == ["iter_0000002.safetensors"]
    model, _ = load_refiner(out / "model.safetensors", load_config(str(tiny_run)))
    assert model.text.ctx.shape == (8, 128)


def test_corrupt_jpeg_stops_before_training_with_one_line(tiny_run, tmp_path, voc_sample):
    root = tmp_path / "data"
    victim = root / "JPEGImages" / f"{sample_ids(voc_sample, 3)[2]}.jpg"
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[: len(data) // 3])
    proc = _weakclip("train", "--config", str(tiny_run), "--output", str(tmp_path / "run"))
    assert proc.returncode == 2
    err = [line for line in proc.stderr.replace("\r", "\n").splitlines() if line.startswith("weakclip:")]
    assert len(err) == 1 and str(victim) in err[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tiny_run, tmp_path, monkeypatch):
    import weakclip.train as train_mod

    real = train_mod.weakclip_losses
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        out = real(*args, **kw)
        if calls["n"] == 3:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(train_mod, "weakclip_losses", poisoned)
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_run), "--output", str(out)]) == 2
    assert [p.name for p in (out / "checkpoints").glob("*.safetensors")] == ["iter_0000002.safetensors"]
    assert not (out / "model.safetensors").exists()


def test_periodic_validation_logs_miou(tiny_run, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--config", str(tiny_run), "--output", str(out), "--set", "data.val_split=train",
                 "--set", "train.val_every=2"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "val/miou" in header
    col = header.index("val/miou")
    values = [r.split(",")[col] for r in rows[1:] if len(r.split(",")) > col and r.split(",")[col]]
    assert len(values) == 2 and all(0 <= float(v) <= 100 for v in values)

"""Output folders that never lose a file (weakclip.jobs): foreign files and other commands' folders are refused
untouched, a settings change is refused naming the settings, --reset removes only our own outputs, jobs with
other settings never mix, killed jobs resume to byte-identical files, files follow the umask, temporary files
are neither read nor left behind."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_data_root, sample_ids, write_tiny_config
from label_map_writer import write

from weakclip.cli import build_parser, main
from weakclip.config import load_config
from weakclip.data.datasets import list_samples
from weakclip.data.masks import write_mask
from weakclip.errors import WeakclipError
from weakclip.jobs import OutputFolder, inference_fingerprint
from weakclip.metrics import evaluate_dirs
from weakclip.visualize import visualize_dirs

WRITER = Path(__file__).with_name("label_map_writer.py")


@pytest.fixture
def setup(tmp_path, voc_sample):
    ids = sample_ids(voc_sample, 4)
    root = make_data_root(tmp_path / "data", voc_sample, ids)
    config = write_tiny_config(tmp_path / "tiny.yaml", root, infer={"crf": False})
    return SimpleNamespace(ids=ids, root=root, config=config, voc=voc_sample)


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png")) if not p.name.startswith(".")}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _start(config, out, tag, reset=False, delay=0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(WRITER), str(config), str(out), str(tag), "1" if reset else "0",
                             str(delay)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


# ----------------------------------------------------------------------------- what is not ours stays


def test_a_folder_of_other_files_is_refused_and_kept_byte_identical(setup, tmp_path, capsys):
    # The case that lost a file: ground-truth PNGs in the folder given to `weakclip seeds`, one image listed.
    one = make_data_root(tmp_path / "one", setup.voc, setup.ids[:1])
    config = write_tiny_config(tmp_path / "one.yaml", one)
    out = tmp_path / "gt"
    out.mkdir()
    for i in setup.ids[:2]:
        shutil.copy(setup.voc / "SegmentationClass" / f"{i}.png", out / f"{i}.png")
    before = _tree(out)
    assert main(["seeds", "--config", str(config), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err and "holds 2 files" in err and "no manifest.json" in err
    assert _tree(out) == before  # nothing deleted, nothing added (lock files are hidden and empty)
    assert main(["seeds", "--config", str(config), "--output", str(out), "--reset"]) == 2  # --reset changes nothing
    assert _tree(out) == before


def test_another_commands_folder_is_refused(setup, tmp_path, capsys):
    out = tmp_path / "masks"
    write(str(setup.config), str(out), 1)
    before = _tree(out)
    assert main(["seeds", "--config", str(setup.config), "--output", str(out), "--reset"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"weakclip: error: {out}: written by `weakclip pseudo-masks`, not `weakclip seeds`; nothing was changed: "
        f"choose another --output folder")
    with pytest.raises(WeakclipError, match="written by `weakclip pseudo-masks`, not `weakclip predict`"):
        OutputFolder(out, "predict", {"tag": 1}, ("*.png",), reset=True).open()
    assert _tree(out) == before


def test_a_settings_change_is_refused_naming_them_and_reset_removes_only_our_files(setup, tmp_path):
    cfg = load_config(str(setup.config))
    samples = list_samples(cfg.data, need_seeds=False)
    ckpt = tmp_path / "weights.bin"
    ckpt.write_bytes(b"weights")
    model = SimpleNamespace()  # no refiner settings: the checkpoint's bytes stand for the model
    out = tmp_path / "masks"

    def fingerprint(**infer):
        c = load_config(str(setup.config), [f"infer.{k}={v}" for k, v in infer.items()])
        return inference_fingerprint(c, ckpt, model, samples, True)

    base = fingerprint(scales="[0.5,1.0]")
    folder = OutputFolder(out, "pseudo-masks", base, ("*.png", "probs"))
    folder.open()
    folder.close()
    write_mask(out / f"{samples[0].id}.png", np.zeros((4, 4), np.uint8))  # one of our outputs
    (out / "notes.txt").write_text("mine")
    (out / "extra").mkdir()
    (out / "extra" / "keep.png").write_bytes(b"not ours")

    # Speed-only settings are not in the fingerprint: they never trigger a refusal.
    assert fingerprint(scales="[0.5,1.0]", batch_size=7, crf_workers=5) == base
    changed = fingerprint(scales="[0.5,1.0,1.5]")
    with pytest.raises(WeakclipError) as refused:
        OutputFolder(out, "pseudo-masks", changed, ("*.png", "probs")).open()
    message = str(refused.value)
    assert "infer.scales: [0.5, 1.0] -> [0.5, 1.0, 1.5]" in message and "--reset" in message
    assert "\n" not in message and (out / f"{samples[0].id}.png").is_file()

    folder = OutputFolder(out, "pseudo-masks", changed, ("*.png", "probs"), reset=True)
    folder.open()
    folder.close()
    assert not (out / f"{samples[0].id}.png").exists()  # ours: discarded
    assert (out / "notes.txt").read_text() == "mine" and (out / "extra" / "keep.png").read_bytes() == b"not ours"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"] == 2 and manifest["settings"]["infer"]["scales"] == [0.5, 1.0, 1.5]
    # A new folder is always fine, and the same settings resume (no generation bump).
    OutputFolder(tmp_path / "new" / "deeper", "pseudo-masks", changed, ("*.png",)).open()
    write_mask(out / f"{samples[0].id}.png", np.zeros((4, 4), np.uint8))
    again = OutputFolder(out, "pseudo-masks", changed, ("*.png",), reset=True)
    again.open()
    again.close()
    assert json.loads((out / "manifest.json").read_text())["generation"] == 2
    assert (out / f"{samples[0].id}.png").is_file()


def test_every_command_that_can_refuse_has_reset():
    parser = build_parser()
    for argv in (["seeds", "--config", "c", "--output", "o"], ["pseudo-masks", "--config", "c", "--checkpoint", "w",
                 "--output", "o"], ["predict", "--config", "c", "--checkpoint", "w", "--split", "s", "--output", "o"],
                 ["train", "--config", "c", "--output", "o"]):
        assert parser.parse_args([*argv, "--reset"]).reset and not parser.parse_args(argv).reset


# --------------------------------------------------------------------------------------- jobs never mix


def test_writers_with_the_same_settings_share_and_other_settings_wait_for_them(tmp_path):
    out = tmp_path / "o"
    first, second = (OutputFolder(out, "seeds", {"a": 1}, ("*.png",)) for _ in range(2))
    first.open()
    second.open()  # same settings: together
    other = OutputFolder(out, "seeds", {"a": 2}, ("*.png",), reset=True)
    for alive in (first, second):
        with pytest.raises(WeakclipError, match=r"a job with other settings \(a: 1 -> 2\) is still writing"):
            other.open()
        alive.close()
    other.open()  # the last writer is gone: the reset goes ahead
    other.close()
    assert json.loads((out / "manifest.json").read_text())["settings"] == {"a": 2}


def test_temporary_files_of_a_live_writer_stay_and_old_ones_go(tmp_path):
    out = tmp_path / "o"
    alive = OutputFolder(out, "seeds", {"a": 1}, ("*.png",))
    alive.open()
    fresh, stale = out / ".weakclip-tmp.x.png.00000001", out / ".weakclip-tmp.y.png.00000002"
    fresh.write_bytes(b"in flight")
    stale.write_bytes(b"left by a killed job")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    beside = OutputFolder(out, "seeds", {"a": 1}, ("*.png",))
    beside.open()  # another writer is alive: only what is older than any write can take goes
    assert fresh.exists() and not stale.exists()
    beside.close()
    alive.close()
    OutputFolder(out, "seeds", {"a": 1}, ("*.png",)).open()  # alone: every leftover goes
    assert not fresh.exists()


def test_a_writer_reset_under_it_stops_before_renaming(tmp_path):
    # Without locks (some network file systems) a reset can happen under a live writer: its next rename is
    # refused by the generation check.
    out = tmp_path / "o"
    writer = OutputFolder(out, "seeds", {"a": 1}, ("*.png",))
    guard = writer.open()
    write_mask(out / "x.png", np.ones((3, 3), np.uint8), guard)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "settings": {"a": 2}, "generation": 2}))
    with pytest.raises(WeakclipError, match="reset by another job with other settings"):
        write_mask(out / "y.png", np.ones((3, 3), np.uint8), guard)
    assert not (out / "y.png").exists() and not list(out.glob(".weakclip-tmp.*"))
    writer.close()


def test_a_file_system_without_locks_gets_one_line_and_still_works(tmp_path, monkeypatch, capsys):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    folder = OutputFolder(tmp_path / "o", "seeds", {"a": 1}, ("*.png",))
    guard = folder.open()
    folder.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no file locks (No locks available)" in err[0] and err[0].startswith("weakclip: warning:")
    write_mask(tmp_path / "o" / "x.png", np.ones((3, 3), np.uint8), guard)
    assert (tmp_path / "o" / "x.png").is_file()


def test_two_jobs_with_other_settings_started_together_never_mix(setup, tmp_path):
    refs = {tag: _pngs(Path(write(str(setup.config), str(tmp_path / f"ref{tag}"), tag)["output"])) for tag in (1, 2)}
    assert refs[1].keys() == refs[2].keys() and refs[1] != refs[2]
    out = tmp_path / "shared"
    for resets in ((False, True), (True, True)):
        procs = [_start(setup.config, out, tag, reset, delay=0.2) for tag, reset in zip((1, 2), resets)]
        logs = [p.communicate(timeout=300)[0] for p in procs]
        codes = [p.returncode for p in procs]
        assert 0 in codes and set(codes) <= {0, 3}, logs
        tag = json.loads((out / "manifest.json").read_text())["settings"]["tag"]
        pngs = _pngs(out)
        assert pngs and all(pngs[name] == refs[tag][name] for name in pngs), (tag, logs)
        if codes == [0, 0]:  # one ran after the other: the last one's maps, all of them
            assert pngs == refs[tag]
        for log, code in zip(logs, codes):
            assert code == 0 or log.startswith("refused: ") and log.count("\n") == 1


# -------------------------------------------------------------------------------------- durable files


def test_killed_jobs_rerun_to_byte_identical_maps(setup, tmp_path):
    reference = _pngs(Path(write(str(setup.config), str(tmp_path / "ref"), 1)["output"]))
    out = tmp_path / "killed"
    rng = random.Random(0)
    done = 0
    for _ in range(3):  # each killed at a random point with at least one image left
        proc = _start(setup.config, out, 1, delay=0.3)  # about 0.3 s per image
        target = rng.randint(done, len(reference) - 2)
        deadline = time.monotonic() + 120
        while len(_pngs(out)) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        done = len(_pngs(out))
        assert done < len(reference)  # killed before the end
        assert all(reference[name] == data for name, data in _pngs(out).items())  # what is there is whole
    proc = _start(setup.config, out, 1)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    assert _pngs(out) == reference
    assert not list(out.glob(".weakclip-tmp.*")) and (out / "summary.json").is_file()


def test_files_follow_the_umask(setup, tmp_path):
    old = os.umask(0o022)
    try:
        write(str(setup.config), str(tmp_path / "m"), 1)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "m").iterdir() if not p.name.startswith(".")]
    assert len(files) == len(setup.ids) + 2  # maps, manifest, summary
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_a_leftover_temporary_file_is_not_read_and_is_removed_by_the_next_run(setup, tmp_path):
    out = tmp_path / "m"
    write(str(setup.config), str(out), 1)
    gt = setup.root / "SegmentationClass"
    names = load_config(str(setup.config)).data.class_names
    scored = evaluate_dirs(out, gt, names, progress=False)
    # What a killed writer leaves: a complete-looking PNG under a temporary name, ours and an earlier
    # version's (which ends in .png: only skipping dotfiles keeps it out).
    leftover = out / f".weakclip-tmp.{setup.ids[0]}.png.1a2b3c4d"
    older = out / f".{setup.ids[0]}.png.x1y2.tmp.png"
    for path in (leftover, older):
        shutil.copy(gt / f"{setup.ids[0]}.png", path)
    again = evaluate_dirs(out, gt, names, progress=False)
    assert again.num_images == scored.num_images == len(setup.ids) and again.miou == scored.miou
    grids = visualize_dirs(setup.root / "JPEGImages", [out], tmp_path / "grids", num=100)
    assert sorted(p.stem for p in grids) == sorted(setup.ids)
    assert write(str(setup.config), str(out), 1)["written"] == 0
    assert not leftover.exists()

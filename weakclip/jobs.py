"""The dataset-scale runner behind ``weakclip seeds``, ``pseudo-masks`` and ``predict``: hours to days of
work, often as job arrays, into one output folder that never loses a file.

* :class:`OutputFolder`: ``manifest.json`` names the command, its settings and a generation counter. A
  non-empty folder without a manifest, or one written by another command, is refused; one written with
  other settings is refused naming the settings that differ, unless ``reset`` (``--reset``), which
  discards that command's own outputs and nothing else. Every writer holds a shared lock on the folder for
  its whole life, so writers with the same settings (processes, torchrun ranks, ``--shard`` jobs) run
  together and a job with other settings is refused while one is alive; before every rename a writer
  checks the generation, so one whose folder was reset under it stops without renaming a file into place.
* :func:`run_jobs`: listing and sharding, start-up once (rank 0), image prefetch, a bounded pool of CRF
  worker processes (:class:`CRFPool`), progress, Ctrl-C and SIGTERM, the summary.
* :func:`write_label_maps` and :func:`pseudo_masks`: the label maps of a refiner or segmenter; seeds
  (:mod:`weakclip.seeds`) call :func:`run_jobs` too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import multiprocessing as mp
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .checkpoints import clip_weights_identity
from .config import Config, CRFConfig, InferConfig, ModelConfig, flatten
from .data.datasets import Sample, labels_source, load_image
from .data.masks import write_mask
from .distributed import (
    DistInfo,
    Shard,
    all_reduce_sum,
    available_cores,
    init_distributed,
    launch_share,
    run_once,
)
from .errors import WeakclipError, warn
from .fileio import TMP_PREFIX, atomic_path, file_sha256, fsync_dir, is_hidden, write_text_atomic
from .infer import (
    Predictor,
    crf_inputs,
    finish_label_map,
    multiscale_probs,
    refiner_from_checkpoint,
)

# Collectives of an inference launch wait for the slowest rank's last images: far longer than training's.
INFERENCE_TIMEOUT = timedelta(hours=12)
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
MANIFEST_FORMAT = 3
# Lock files: held briefly by a job checking (and maybe resetting) the folder, and for its whole life by
# every writer (shared).
SETUP_LOCK = ".weakclip-lock"
WRITERS_LOCK = ".weakclip-writers"
# A temporary file this old cannot belong to a live writer (one PNG or .npz takes well under a second).
_ORPHAN_TMP_S = 600
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


# ------------------------------------------------------------------------------------ output folder


def settings_diff(old: dict, new: dict, limit: int = 3) -> str:
    """The settings that differ as ``key: old -> new`` (JSON values), the first ``limit`` of them."""
    a, b = flatten(old), flatten(new)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k, "(unset)") != b.get(k, "(unset)")]
    show = lambda v: "(unset)" if v == "(unset)" else json.dumps(v)
    parts = [f"{k}: {show(a.get(k, '(unset)'))} -> {show(b.get(k, '(unset)'))}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


def _read_manifest(path: Path) -> dict | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        raise WeakclipError(f"{path}: not valid JSON; move the folder aside or remove this file") from None
    if not isinstance(manifest, dict):
        raise WeakclipError(f"{path}: not a weakclip manifest; move the folder aside or remove this file")
    return manifest


@dataclasses.dataclass(frozen=True)
class RenameGuard:
    """Called before each rename into an output folder (picklable: CRF workers call it): stops a writer whose
    folder was reset under it (on file systems without locks), before the file lands."""

    manifest: str
    generation: int

    def __call__(self) -> None:
        try:
            now = json.loads(Path(self.manifest).read_text()).get("generation")
        except (OSError, json.JSONDecodeError, AttributeError):
            now = None
        if now != self.generation:
            raise WeakclipError(f"{Path(self.manifest).parent}: reset by another job with other settings while "
                                f"this one was writing; this job stopped without writing its next file")


class OutputFolder:
    """A dataset-scale command's output folder (see the module docstring).

    ``outputs``: glob patterns (files or folders) of what ``command`` writes there, removed on a reset.
    :meth:`open` checks the folder and takes the writers' lock; :meth:`close` releases it.
    """

    def __init__(self, path: str | Path, command: str, settings: dict, outputs: Sequence[str],
                 reset: bool = False, reset_flag: str = "--reset") -> None:
        self.path = Path(path)
        self.command = command
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the manifest
        self.outputs = tuple(outputs)
        self.reset = reset
        self.reset_flag = reset_flag
        self.guard: RenameGuard | None = None
        self._writers = None  # the open lock file held for the writer's lifetime
        self._warned = False

    def _lock(self, f, flags: int) -> bool:
        """flock ``f``; False when ``LOCK_NB`` and someone else holds it. No locks on this file system: one
        warning, then True (see the README: jobs with other settings are then only stopped by the guard)."""
        try:
            fcntl.flock(f, flags)
            return True
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                raise
            if not self._warned:
                self._warned = True
                warn(f"{self.path}: this file system has no file locks ({exc.strerror}); jobs with other settings "
                     f"are not kept out of this folder, only stopped before their next file when it is reset")
            return True

    def open(self) -> RenameGuard:
        """Check the folder, reset it when allowed, write the manifest, hold the writers' lock; returns the
        guard every write into the folder passes."""
        if self.path.is_dir() and not (self.path / MANIFEST).exists():
            self._check_empty()  # before creating the lock files: a refused folder is left exactly as it was
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / SETUP_LOCK, "a") as setup:
            self._lock(setup, fcntl.LOCK_EX)
            try:
                return self._open_locked()
            finally:
                self._lock(setup, fcntl.LOCK_UN)

    def _open_locked(self) -> RenameGuard:
        manifest = _read_manifest(self.path / MANIFEST)
        writers = open(self.path / WRITERS_LOCK, "a")  # noqa: SIM115 - held open until close()
        try:
            alone = self._lock(writers, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if manifest is None:
                self._check_empty()
                generation = 1
            else:
                generation = self._check_manifest(manifest, alone)
            self._remove_temporary(older_than=time.time() - (0 if alone else _ORPHAN_TMP_S))
            if manifest is None or generation != manifest.get("generation"):
                write_text_atomic(self.path / MANIFEST, json.dumps(
                    {"format": MANIFEST_FORMAT, "command": self.command, "generation": generation,
                     "settings": self.settings}, indent=1, sort_keys=True) + "\n")
            self._lock(writers, fcntl.LOCK_SH)  # held (shared with same-settings writers) until close()
        except BaseException:
            writers.close()
            raise
        self._writers = writers
        self.guard = RenameGuard(str(self.path / MANIFEST), generation)
        return self.guard

    def _check_empty(self) -> None:
        """A folder without a manifest must hold nothing but our lock and temporary files."""
        entries = [p for p in self.path.iterdir()
                   if p.name not in (SETUP_LOCK, WRITERS_LOCK) and not p.name.startswith(TMP_PREFIX)]
        if entries and not (self.path / MANIFEST).exists():  # (a job starting beside us may have just written it)
            folders = sum(p.is_dir() for p in entries)
            what = f"{len(entries) - folders} file{'s' * (len(entries) - folders != 1)}"
            if folders:
                what += f" and {folders} folder{'s' * (folders != 1)}"
            raise WeakclipError(f"{self.path}: not a weakclip output folder (no {MANIFEST}) and it holds {what}; "
                                f"nothing was changed: choose a new or empty --output folder")

    def _check_manifest(self, manifest: dict, alone: bool) -> int:
        """The generation to write under: the manifest's own for the same command and settings; the next one
        after a reset. Refuses another command's folder, and other settings without ``reset`` or while a
        writer is alive."""
        command = manifest.get("command") or ("seeds" if manifest.get("kind") == "seeds" else self.command)
        if command != self.command:
            raise WeakclipError(f"{self.path}: written by `weakclip {command}`, not `weakclip {self.command}`; "
                                f"nothing was changed: choose another --output folder")
        old = manifest.get("settings") if manifest.get("format") == MANIFEST_FORMAT else None
        if old == self.settings:
            return int(manifest["generation"])
        diff = (settings_diff(old, self.settings) if old is not None
                else f"manifest format {manifest.get('format')} -> {MANIFEST_FORMAT}")
        if not self.reset:
            raise WeakclipError(f"{self.path}: written with other settings ({diff}); rerun with {self.reset_flag} "
                                f"to discard its {self.command} outputs, or choose another --output folder")
        if not alone:
            raise WeakclipError(f"{self.path}: a job with other settings ({diff}) is still writing to it; "
                                f"nothing was changed: wait for it to end, or choose another --output folder")
        self._remove_outputs()
        return int(manifest.get("generation") or 0) + 1

    def _remove_outputs(self) -> None:
        for pattern in self.outputs:
            for entry in self.path.glob(pattern):
                if is_hidden(entry):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink(missing_ok=True)
        (self.path / SUMMARY).unlink(missing_ok=True)
        fsync_dir(self.path)

    def _remove_temporary(self, older_than: float) -> None:
        """Temporary files left by killed writers (in the folder and its subfolders), written before
        ``older_than`` (now, when no other writer is alive)."""
        for tmp in [*self.path.glob(TMP_PREFIX + "*"), *self.path.glob(f"*/{TMP_PREFIX}*")]:
            with contextlib.suppress(FileNotFoundError):
                if tmp.stat().st_mtime <= older_than:
                    tmp.unlink()

    def close(self) -> None:
        """Release the writers' lock (a no-op when not open, e.g. on ranks other than 0)."""
        if self._writers is not None:
            self._writers.close()
            self._writers = None


# -------------------------------------------------------------------------------------------- CRF pool


def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the main process decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def crf_worker_count(icfg: InferConfig) -> int:
    """``icfg.crf_workers``, or when null the cores available to this process but one (the one that feeds
    the network), at least 1."""
    if icfg.crf_workers is not None:
        if icfg.crf_workers < 0:
            raise WeakclipError(f"infer.crf_workers: expected 0 or more (or null: auto), got {icfg.crf_workers}")
        return icfg.crf_workers
    return max(1, available_cores() - 1)


def _finish(job: tuple) -> str:
    """Worker: CRF over the kept classes, label map, Eq. 14 marks, atomic PNG. Returns the image id."""
    sample_id, kept, keys, image, unknown, out_path, crf_params, ignore_index, guard = job
    write_mask(out_path, finish_label_map(kept, keys, image, unknown, crf_params, ignore_index), guard)
    return sample_id


class CRFPool:
    """Finishes images (CRF, label map, PNG) in ``workers`` processes through a bounded queue.

    :meth:`submit` returns at once while fewer than ``capacity`` jobs are in flight and otherwise waits
    for the oldest: back-pressure keeps at most ``capacity`` images' probabilities in memory, and the
    caller runs the network on the next image while the workers run CRFs. ``workers=0`` finishes each job
    in the calling process. ``finish`` (a module-level function, so workers can import it) does the work.
    """

    def __init__(self, workers: int, capacity: int | None = None, finish: Callable[[tuple], str] = _finish):
        self.finish = finish
        self.capacity = capacity or 2 * workers
        self.pending: deque = deque()
        self.pool = mp.get_context("spawn").Pool(workers, initializer=_ignore_sigint) if workers > 0 else None

    def submit(self, job: tuple) -> list[str]:
        """Queue one job; returns the ids of the images finished meanwhile (in submission order)."""
        if self.pool is None:
            return [self.finish(job)]
        self.pending.append(self.pool.apply_async(self.finish, (job,)))
        done = []
        while len(self.pending) > self.capacity or (self.pending and self.pending[0].ready()):
            done.append(self.pending.popleft().get())
        return done

    def drain(self) -> Iterator[str]:
        """Ids of the remaining images as they finish."""
        while self.pending:
            yield self.pending.popleft().get()

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the workers, first giving the jobs in flight up to ``wait_s`` seconds to finish."""
        deadline = time.monotonic() + wait_s
        for result in self.pending:
            result.wait(timeout=max(0.0, deadline - time.monotonic()))
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (Slurm's time limit, torchrun stopping a launch) stops like Ctrl-C: files in flight finish."""

    def on_term(signum, frame):
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def finish_jobs(jobs: Iterable[tuple], total: int, workers: int, finish: Callable[[tuple], str], info: DistInfo,
                desc: str, progress: bool = True) -> None:
    """``finish`` every job of ``jobs`` in a :class:`CRFPool` of ``workers`` processes while the generator
    makes the next ones (the network's part), with a progress bar of ``total`` on the main process. Ctrl-C
    or SIGTERM (a scheduler's time limit) gives the jobs in flight up to 60 s before stopping: their CRF
    takes a moment, redoing their network part takes longer."""
    pool = CRFPool(workers if total else 0, finish=finish)
    bar = tqdm(total=total, desc=desc if info.world_size == 1 else f"{desc} (rank 0 of {info.world_size})",
               disable=not (progress and info.is_main), dynamic_ncols=True)
    try:
        with _sigterm_as_interrupt():
            for job in jobs:
                bar.update(len(pool.submit(job)))
            for _ in pool.drain():
                bar.update(1)
    except KeyboardInterrupt:
        pool.close(wait_s=60)
        raise
    finally:
        bar.close()
        pool.close()


# ------------------------------------------------------------------------------------------ runner


def _prefetch(load: Callable[[Sample], np.ndarray], samples: Sequence[Sample], ahead: int = 2
              ) -> Iterator[tuple[Sample, np.ndarray]]:
    """(sample, load(sample)) in order, decoding the next images in a thread while the caller works."""
    with ThreadPoolExecutor(1) as pool:
        queue: deque = deque()
        for sample in samples:
            queue.append((sample, pool.submit(load, sample)))
            if len(queue) > ahead:
                first, future = queue.popleft()
                yield first, future.result()
        while queue:
            first, future = queue.popleft()
            yield first, future.result()


def run_jobs(folder: OutputFolder, samples: Sequence[Sample], done: Callable[[Sample], bool],
             make_jobs: Callable[[Iterator[tuple[Sample, np.ndarray]], RenameGuard], Iterator[tuple]],
             finish: Callable[[tuple], str], workers: int, info: DistInfo, desc: str,
             shard: Shard | None = None, progress: bool = True, counters: dict[str, Tensor] | None = None
             ) -> dict:
    """Run a dataset-scale command over ``samples`` into ``folder``: resumable, shardable, never mixed.

    Every process of a launch (``info``) calls this with the same ``samples``; an independent job of a job
    array passes its ``shard``. Rank 0 opens the folder and lists the images not ``done`` in the job's
    share (``shard.take(samples)``); these are split between the ranks, so any mix of launches and shards
    fills the folder and a rerun does only what is missing. ``make_jobs(images, guard)`` turns this rank's
    (sample, decoded image) pairs into jobs for ``finish`` (run in ``workers`` processes, every write
    passing ``guard``). When every sample is done, the main process writes ``summary.json``.

    Returns {"output", "written" (by this launch), "skipped", "missing" (images of ``samples`` not done
    yet, e.g. left to other shards)}, "missing" on the main process only, and each of ``counters`` (scalar
    tensors on ``info.device`` that ``make_jobs`` adds to) summed over the ranks.
    """
    counters = counters or {}
    shard = shard or Shard()
    started = time.time()
    share = shard.take(samples)

    def prepare() -> tuple[list[int], RenameGuard]:
        guard = folder.open()
        with ThreadPoolExecutor(8) as pool:  # stat calls on a network file system wait on the server
            todo = [i for i, d in enumerate(pool.map(done, share)) if not d]
            exists = list(pool.map(lambda i: share[i].image.is_file(), todo))
        missing = [share[i].image for i, ok in zip(todo, exists) if not ok]
        if missing:
            raise WeakclipError(f"{missing[0]}: image not found ({len(missing)} of the listed images are missing)")
        return todo, guard

    try:
        todo, guard = run_once(prepare, info)
        mine = [share[i] for i in launch_share(info).take(todo)]
        # make_jobs may set up its model (and fail in one line) before the progress bar starts; not when idle.
        jobs = make_jobs(_prefetch(lambda s: load_image(s.image), mine), guard) if mine else iter(())
        finish_jobs(jobs, len(mine), workers, finish, info, desc, progress)
        counts = all_reduce_sum(torch.stack([torch.tensor(len(mine), device=info.device), *counters.values()]),
                                info)  # waits for every rank
        result = {"output": str(folder.path), "written": int(counts[0]), "skipped": len(share) - len(todo),
                  **{k: int(c) for k, c in zip(counters, counts[1:])}}
        if info.is_main:
            with ThreadPoolExecutor(8) as pool:
                result["missing"] = sum(not d for d in pool.map(done, samples))
            if result["missing"] == 0:
                seconds = time.time() - started
                run = {"written": result["written"], "skipped": result["skipped"], "processes": info.world_size,
                       "shard": str(shard), "crf_workers": workers, "seconds": round(seconds, 1),
                       "images_per_s": round(result["written"] / seconds, 3)}
                with atomic_path(folder.path / SUMMARY, guard) as tmp:
                    tmp.write_text(json.dumps({"images": len(samples), "last_run": run}, indent=1) + "\n")
        return result
    finally:
        folder.close()


# -------------------------------------------------------------------------------------- label maps


def write_label_maps(
    predict: Predictor,
    samples: Sequence[Sample],
    out_dir: str | Path,
    icfg: InferConfig,
    info: DistInfo,
    fingerprint: dict,
    use_labels: bool,
    crf_params: CRFConfig | None,
    save_probs: bool = False,
    ignore_index: int = 255,
    progress: bool = True,
    desc: str = "infer",
    shard: Shard | None = None,
    command: str = "pseudo-masks",
    reset: bool = False,
    maps_dir: str = ".",
    other_outputs: Sequence[str] = (),
    num_classes: int | None = None,
) -> dict:
    """One palette PNG per sample into ``out_dir/maps_dir`` through :func:`run_jobs` (resumable, shardable,
    never mixed), as ``command``, whose other files in ``out_dir`` (``other_outputs``, glob patterns) a
    reset discards with the maps.

    ``fingerprint`` (checkpoint hash and every setting that changes the output, never the list, the share,
    the batch size or worker counts) goes into the folder's manifest: a folder written with another one is
    refused unless ``reset``. CRFs run in :func:`crf_worker_count` processes (:class:`CRFPool`) while the
    network infers the next images, so full-resolution probabilities never touch the disk; ``save_probs``
    keeps, in ``probs/<id>.npz``, the CRF's input (background + the image's classes, or the classes present
    without a label filter) as float16 at ``icfg.save_probs_size`` short side, with their class indices and
    the Eq. 14 marks.

    ``num_classes``: the config's classes, the predictor's first outputs; the predictor's other classes (a
    checkpoint's classes the config does not list) are never written: pixels they win become
    ``ignore_index`` and are counted in the result's "other_class_pixels".
    """
    out_dir = Path(out_dir)
    other = torch.zeros((), dtype=torch.long, device=info.device)
    maps = out_dir / maps_dir
    settings = {**fingerprint, "label_filter": use_labels, "crf": crf_params is not None,
                "save_probs_size": icfg.save_probs_size if save_probs else None}
    outputs = ("*.png", "probs", *((maps_dir,) if maps_dir != "." else ()), *other_outputs)
    folder = OutputFolder(out_dir, command, settings, outputs, reset)
    workers = crf_worker_count(icfg) if crf_params is not None else 0

    def done(s: Sample) -> bool:
        return (maps / f"{s.id}.png").is_file() and (not save_probs or (out_dir / "probs" / f"{s.id}.npz").is_file())

    def jobs(images: Iterator[tuple[Sample, np.ndarray]], guard: RenameGuard) -> Iterator[tuple]:
        for sample, image in images:
            probs = multiscale_probs(predict, image, icfg, info.device)
            if num_classes is not None:
                other.add_((probs.argmax(0) >= num_classes).sum())
            kept, keys, unknown = crf_inputs(probs, sample.labels if use_labels else None, num_classes)
            if save_probs:
                _save_probs(out_dir / "probs" / f"{sample.id}.npz", kept, keys, unknown, icfg.save_probs_size, guard)
            yield (sample.id, kept.cpu().numpy().astype(np.float32), keys, image, unknown.cpu().numpy(),
                   maps / f"{sample.id}.png", crf_params, ignore_index, guard)

    return run_jobs(folder, samples, done, jobs, _finish, workers, info, desc, shard, progress,
                    counters={"other_class_pixels": other})


def _save_probs(path: Path, kept: Tensor, keys: Sequence[int], unknown: Tensor, short: int,
                guard: Callable[[], None] | None = None) -> None:
    """kept (len(keys), H, W) -> ``path`` (.npz): probs float16 at ``short`` short side, classes, unknown."""
    h, w = kept.shape[1:]
    r = min(1.0, short / min(h, w))
    size = (max(1, round(h * r)), max(1, round(w * r)))
    small = F.interpolate(kept[None], size=size, mode="bilinear", align_corners=False)[0]
    marks = F.interpolate(unknown[None, None].float(), size=size, mode="nearest")[0, 0] > 0.5
    with atomic_path(path, guard) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, probs=small.cpu().numpy().astype(np.float16),
                            classes=np.asarray(keys, dtype=np.int16), unknown=marks.cpu().numpy())


def _labels_identity(cfg: Config, samples: Sequence[Sample]) -> dict:
    """Where the image-level labels come from and what they are: the labels file's sha256 (whatever the
    list), or, for labels taken from the seeds, a digest of the listed images' labels."""
    source = labels_source(cfg.data)
    if source.startswith("file ") and Path(source[5:]).is_file():
        return {"source": source, "sha256": file_sha256(source[5:])}
    text = json.dumps([[s.id, list(s.labels)] for s in samples])
    return {"source": source, "sha256": hashlib.sha256(text.encode()).hexdigest()}


def inference_fingerprint(cfg: Config, checkpoint: str | Path, model: torch.nn.Module, samples: Sequence[Sample],
                          use_labels: bool) -> dict:
    """Everything that changes a label map, for the manifest: the checkpoint's bytes; for a refiner its model
    settings (CLIP model, normalisation, class token, taps, ...) and the identity of its CLIP weights; the
    classes; the image-level labels and their source (when the filter uses them); the data root and the
    inference settings. Not the list or the share, nor the batch size or worker counts (speed only)."""
    speed_only = ("crf_workers", "save_probs_size", "batch_size")
    infer = {k: v for k, v in cfg.infer.__dict__.items() if k not in speed_only}
    settings = getattr(model, "cfg", None)
    refiner = None
    if isinstance(settings, ModelConfig):  # a retrained segmenter's settings are all in its checkpoint
        tree = dataclasses.asdict(settings)
        del tree["clip"]["pretrained"]  # stands for the weights' identity, not the path
        refiner = {"model": tree, "clip_weights": clip_weights_identity(settings.clip)}
    return {"checkpoint_sha256": file_sha256(checkpoint), "refiner": refiner, "classes": cfg.data.class_names,
            "labels": _labels_identity(cfg, samples) if use_labels else None,
            "data_root": str(Path(cfg.data.root).resolve()),
            "infer": json.loads(json.dumps(infer, default=lambda o: o.__dict__))}


def pseudo_masks(cfg: Config, checkpoint: str | Path, output: str | Path, split: str | None = None,
                 save_probs: bool = False, shard: Shard | None = None, info: DistInfo | None = None,
                 reset: bool = False) -> dict | None:
    """``weakclip pseudo-masks``: the refiner's label maps of ``split`` (default ``cfg.data.split``) with the
    Eq. 14 filter (``infer.label_filter``) and the CRF (``infer.crf``), into ``output`` (see
    :func:`write_label_maps`). Under torchrun every rank calls it; listing, label reading and hashing run
    on rank 0 only. Returns the summary on the main process, None on the others."""
    from .data.datasets import list_samples

    info = info or init_distributed(INFERENCE_TIMEOUT)
    split = split or cfg.data.split
    use_labels = cfg.infer.label_filter
    samples = run_once(lambda: list_samples(cfg.data, split, need_seeds=False, need_labels=use_labels), info)
    # The checkpoint's model: its classes are cfg's, in cfg's order, then any it has beyond them.
    predict, model, used = refiner_from_checkpoint(cfg, checkpoint, info.device)
    cfg = dataclasses.replace(cfg, infer=used.infer)  # view_resize resolved for the model
    fingerprint = run_once(lambda: inference_fingerprint(cfg, checkpoint, model, samples, use_labels), info)
    summary = write_label_maps(
        predict, samples, output, cfg.infer, info, fingerprint, use_labels=use_labels,
        crf_params=cfg.infer.crf_params if cfg.infer.crf else None, save_probs=save_probs,
        ignore_index=cfg.data.ignore_index, desc="pseudo-masks", shard=shard, command="pseudo-masks", reset=reset,
        num_classes=cfg.num_classes)
    return summary if info.is_main else None

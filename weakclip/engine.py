"""The one training engine: iteration-based loop, deterministic data stream, atomic checkpoints with exact
resume, bf16 autocast on GPUs, progress and scalar logs, NaN guard, and DDP under ``torchrun``.

Both the WeakCLIP refiner (``weakclip train``) and the retrained segmenter (``weakclip retrain``) run here;
they differ only in the model, the loss function, the optimizer and the learning-rate schedule.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from .distributed import DistInfo, barrier
from .errors import WeakclipError
from .fileio import atomic_path, write_text_atomic
from .precision import native, warn_if_slow

# ----------------------------------------------------------------------------------------- data stream


class StreamSampler(torch.utils.data.Sampler):
    """The global sample stream: concatenated per-epoch permutations of ``n`` items, seeded by (seed, epoch).

    Iteration ``i`` consumes stream positions [i*B, (i+1)*B) for the global batch B; rank r takes its
    contiguous share. Items are (index, epoch) pairs so augmentation is a pure function of them: resuming
    at iteration i reproduces the exact batches and augmentations, with any number of workers.
    """

    def __init__(self, n: int, seed: int, global_batch: int, start_iter: int, iters: int, rank: int, world: int):
        if n == 0:
            raise WeakclipError("the training list is empty")
        self.n, self.seed, self.global_batch = n, seed, global_batch
        self.start_iter, self.iters, self.rank, self.world = start_iter, iters, rank, world
        self.local_batch = global_batch // world

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        cache: dict[int, np.ndarray] = {}
        for it in range(self.start_iter, self.iters):
            first = it * self.global_batch + self.rank * self.local_batch
            for pos in range(first, first + self.local_batch):
                epoch, offset = divmod(pos, self.n)
                if epoch not in cache:
                    cache = {epoch: self._order(epoch)}
                yield int(cache[epoch][offset]), epoch

    def __len__(self) -> int:
        return (self.iters - self.start_iter) * self.local_batch


class EpochIndexed(torch.utils.data.Dataset):
    """Wraps a dataset with ``set_epoch``/``__getitem__`` so it can be indexed by (index, epoch) pairs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        self.dataset.set_epoch(epoch)
        return self.dataset[index]


# -------------------------------------------------------------------------------------------- schedule


def warmup_cosine(base_lr: float, iters: int, warmup_iters: int, min_lr: float,
                  warmup_ratio: float = 1e-6) -> Callable[[int], float]:
    """Cosine from ``base_lr`` to ``min_lr`` over ``iters``, scaled by a linear warm-up from ``warmup_ratio``."""

    def lr_at(it: int) -> float:
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * it / max(iters, 1)))
        if it < warmup_iters:
            lr *= 1 - (1 - it / warmup_iters) * (1 - warmup_ratio)
        return lr

    return lr_at


def poly(base_lr: float, iters: int, power: float = 0.9) -> Callable[[int], float]:
    """Polynomial decay ``base_lr * (1 - it / iters) ** power``."""
    return lambda it: base_lr * (1 - it / max(iters, 1)) ** power


# ----------------------------------------------------------------------------------------- checkpoints

_CKPT = re.compile(r"^iter_(\d{7})\.safetensors$")


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The state a checkpoint keeps: ``model.weakclip_state_dict()`` where defined (no frozen CLIP)."""
    getter = getattr(model, "weakclip_state_dict", None)
    state = getter() if getter is not None else model.state_dict()
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_trained_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    loader = getattr(model, "load_weakclip_state_dict", None)
    if loader is not None:
        loader(state, source)
        return
    from .clip import check_shapes

    check_shapes(model.state_dict(), state, source, "the model built from this config")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise WeakclipError(f"{source}: checkpoint does not fit the model ({str(exc).splitlines()[0]})") from None


def save_weights(path: Path, model: nn.Module, metadata: dict[str, str]) -> None:
    """Model weights as safetensors, atomically; ``metadata`` (strings) goes into the file's header."""
    with atomic_path(path) as tmp:
        save_file(trained_state(model), str(tmp), metadata=metadata)


def _open_checkpoint(path: Path, with_tensors: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file in one pass; one clear line when it is unusable."""
    from safetensors import safe_open

    if not path.is_file():
        raise WeakclipError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}  # noqa: SIM118 - not a dict
            return tensors, f.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise WeakclipError(f"{path}: not a readable safetensors checkpoint ({exc})") from None


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a weights file written by :func:`save_weights`."""
    return _open_checkpoint(Path(path), with_tensors=False)[1]


def load_weights(path: str | os.PathLike, model: nn.Module) -> dict[str, str]:
    """Load a weights file written by :func:`save_weights` into ``model``; returns its metadata."""
    state, meta = _open_checkpoint(Path(path), with_tensors=True)
    load_trained_state(model, state, str(path))
    return meta


def read_resume_state(path: Path) -> dict:
    """The optimizer and random state saved beside a checkpoint (tensors and plain Python values only),
    read with ``weights_only``: a file whose pickle names anything else is refused in one line and nothing
    in it runs."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch.load raises many types for a bad or unsafe file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise WeakclipError(f"{path}: refused or unreadable resume state, nothing in it was run "
                            f"({type(exc).__name__}: {first[:200]})") from None
    if not isinstance(state, dict) or not {"optimizer", "rng"} <= set(state):
        raise WeakclipError(f"{path}: not a resume state written by weakclip (no optimizer and rng entries)")
    return state


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _CKPT.match(p.name)
            if m and p.with_suffix(".state.pt").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


# ---------------------------------------------------------------------------------------------- logging


class ScalarLog:
    """Scalars to ``metrics.csv`` (rewritten up to the resume point) and TensorBoard event files."""

    def __init__(self, out: Path, start_iter: int):
        self.path = out / "metrics.csv"
        self.rows: list[dict] = []
        if self.path.is_file() and start_iter > 0:
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["iter"]) <= start_iter]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start_iter + 1)
        except ImportError:  # tensorboard is optional: the CSV is always written
            self.tb = None

    def add(self, it: int, scalars: dict[str, float]) -> None:
        self.rows.append({"iter": it, **{k: f"{v:.6g}" for k, v in scalars.items()}})
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, it)

    def flush(self) -> None:
        keys: list[str] = []
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------ loop


@dataclass
class LoopSpec:
    """What the loop needs beyond model, data and loss (a view of TrainConfig / RetrainConfig)."""

    iters: int
    batch_size: int  # global, over all processes
    workers: int = 2
    seed: int = 0
    amp: str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 20
    val_every: int = 0


def resolve_amp(amp: str, device: torch.device) -> str:
    """``train.amp`` on ``device``: "auto" is bf16 on GPUs with native bf16, else fp32; "bf16" where the device
    has no native bf16 runs, with a warning that it is slower than fp32."""
    if amp not in ("auto", "bf16", "fp32"):
        raise WeakclipError(f"train.amp: expected auto, bf16 or fp32, got '{amp}'")
    if amp == "auto":
        return "bf16" if device.type == "cuda" and native(torch.bfloat16, device) else "fp32"
    if amp == "bf16":
        warn_if_slow(torch.bfloat16, device, "train.amp")
    return amp


def _autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if resolve_amp(amp, device) == "bf16" else None


def _collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return out


class _Interrupted(Exception):
    pass


def train_loop(
    model: nn.Module,
    dataset,
    loss_fn: Callable[[nn.Module, dict], dict[str, Tensor]],
    optimizer: torch.optim.Optimizer,
    lr_at: Callable[[int], float],
    spec: LoopSpec,
    output: Path,
    info: DistInfo,
    resume: bool = False,
    metadata: dict[str, str] | None = None,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> Path:
    """Train ``model`` for ``spec.iters`` iterations; returns the path of the final weights.

    ``loss_fn(model, batch)`` returns a dict of scalar tensors with a ``"total"`` entry. ``dataset`` has
    ``set_epoch(epoch)`` and ``__getitem__(index)``. Checkpoints go to ``output/checkpoints`` every
    ``spec.checkpoint_every`` iterations, on interrupt (Ctrl-C / SIGTERM) and at the end; ``resume``
    continues from the newest one exactly (weights, optimizer, schedule, data stream, random state).
    """
    output = Path(output)
    ckpt_dir = output / "checkpoints"
    metadata = dict(metadata or {})
    if spec.batch_size % info.world_size:
        raise WeakclipError(
            f"train.batch_size {spec.batch_size} must be divisible by the number of processes {info.world_size}"
        )
    start = 0
    state = None
    if resume:
        found = list_checkpoints(ckpt_dir)
        if not found:
            raise WeakclipError(f"{ckpt_dir}: --resume given but no checkpoint is there")
        start, weights = found[-1]
        load_weights(weights, model)
        state = read_resume_state(weights.with_suffix(".state.pt"))
        optimizer.load_state_dict(state["optimizer"])
    elif list_checkpoints(ckpt_dir) and info.is_main:
        raise WeakclipError(f"{ckpt_dir}: holds checkpoints of an earlier run; pass --resume or a new --output")

    # The random state of iteration `start`: saved in the checkpoint, or derived from the seed.
    torch.manual_seed(spec.seed + info.rank)
    if state is not None:
        torch.set_rng_state(state["rng"][info.rank] if info.rank < len(state["rng"]) else state["rng"][0])

    model.to(info.device)
    ddp_model = model
    if info.world_size > 1:
        if info.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None
        )
    for group in optimizer.param_groups:  # optimizer state follows the parameters to the device
        for p in group["params"]:
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and k != "step":
                    optimizer.state[p][k] = v.to(info.device)

    sampler = StreamSampler(len(dataset), spec.seed, spec.batch_size, start, spec.iters, info.rank, info.world_size)
    loader = torch.utils.data.DataLoader(
        EpochIndexed(dataset), batch_size=spec.batch_size // info.world_size, sampler=sampler,
        num_workers=spec.workers, collate_fn=_collate, pin_memory=info.device.type == "cuda",
        persistent_workers=False, prefetch_factor=2 if spec.workers else None,
        # Its own generator: creating the iterator must not draw from the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(spec.seed),
    )
    amp_dtype = _autocast_dtype(spec.amp, info.device)
    log = ScalarLog(output, start) if info.is_main else None

    def save(it: int) -> None:
        rng = [torch.get_rng_state()]
        if info.world_size > 1:
            rng = [None] * info.world_size
            dist.all_gather_object(rng, torch.get_rng_state())
        if not info.is_main:
            return
        weights = ckpt_dir / f"iter_{it:07d}.safetensors"
        save_weights(weights, model, {**metadata, "iteration": str(it)})
        with atomic_path(weights.with_suffix(".state.pt")) as tmp:
            torch.save({"iteration": it, "optimizer": optimizer.state_dict(), "rng": rng}, tmp)
        for _, old in list_checkpoints(ckpt_dir)[: -max(spec.keep_checkpoints, 1)]:
            old.with_suffix(".state.pt").unlink(missing_ok=True)
            old.unlink(missing_ok=True)

    def on_signal(signum, frame):  # turn SIGTERM into the same clean stop as Ctrl-C
        raise _Interrupted()

    old_handler = signal.signal(signal.SIGTERM, on_signal)
    bar = tqdm(total=spec.iters, initial=start, disable=not info.is_main, desc="train", dynamic_ncols=True)
    it = start
    last_saved = start if resume else -1
    t0, seen = time.perf_counter(), 0
    ddp_model.train()
    try:
        for batch in loader:
            lr = lr_at(it)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            batch = {k: v.to(info.device, non_blocking=True) if isinstance(v, Tensor) else v
                     for k, v in batch.items()}
            with torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                losses = loss_fn(ddp_model, batch)
            total = losses["total"]
            if not torch.isfinite(total):
                good = list_checkpoints(ckpt_dir)
                where = f"last good checkpoint: {good[-1][1]}" if good else "no checkpoint was written yet"
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise WeakclipError(f"loss is {total.item()} at iteration {it + 1} ({terms}); {where}")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            it += 1
            seen += batch["image"].shape[0] * info.world_size
            if info.is_main and (it % spec.log_every == 0 or it == spec.iters):
                rate = seen / (time.perf_counter() - t0)
                scalars = {f"loss/{k}": v.item() for k, v in losses.items()}
                scalars.update({"lr": lr, "images_per_s": rate})
                log.add(it, scalars)
                bar.set_postfix({k.split("/")[-1]: f"{v:.3g}" for k, v in scalars.items()})
            bar.update(1)
            if validate is not None and spec.val_every and it % spec.val_every == 0:
                ddp_model.eval()
                scores = validate(model)
                ddp_model.train()
                if info.is_main:
                    log.add(it, {f"val/{k}": v for k, v in scores.items()})
                    bar.write(f"iteration {it}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
            if it % spec.checkpoint_every == 0 or it == spec.iters:
                if log is not None:  # first: a checkpoint on disk implies the scalars up to it are too
                    log.flush()
                save(it)
                last_saved = it
    except (KeyboardInterrupt, _Interrupted):
        if it > start and it != last_saved:
            save(it)
        if log is not None:
            log.close()
        bar.close()
        raise WeakclipError(
            f"interrupted at iteration {it}; checkpoint saved in {ckpt_dir}: rerun the same command with --resume"
        ) from None
    finally:
        signal.signal(signal.SIGTERM, old_handler)
    bar.close()
    if log is not None:
        log.close()
    final = output / "model.safetensors"
    if info.is_main:
        save_weights(final, model, {**metadata, "iteration": str(it)})
        write_text_atomic(output / "train_done.json", json.dumps({"iterations": it}) + "\n")
    barrier(info)
    return final

"""A small, resumable training loop shared by the prompter and the student.

* Runs ``steps`` optimisation steps (or stops early at ``max_minutes``), in epochs of
  ``steps_per_epoch``; AdamW with a cosine learning-rate decay.
* After every epoch: a line in ``<run>/log.jsonl`` (epoch, step, losses, validation Dice when a
  validation function is given, learning rate, seconds), and ``<run>/last.pt`` (network,
  optimiser, scheduler, step, RNG states) written atomically, so ``resume=True`` continues exactly
  where it stopped. The best validation epoch is also kept as ``<run>/best.pt``.
* A tqdm bar shows the step, loss and ETA.
"""

from __future__ import annotations

import io
import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..outputs import atomic_write_bytes

__all__ = ["TrainConfig", "train_loop", "seed_everything"]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class TrainConfig:
    """Loop settings.

    Args:
        steps: total optimisation steps.
        steps_per_epoch: steps between log lines, checkpoints and validations.
        lr: peak learning rate (AdamW, cosine decay to 2% of it).
        weight_decay: AdamW weight decay.
        max_minutes: stop (after saving) once this much wall time has passed; None = no limit.
        seed: RNG seed.
    """

    def __init__(self, steps: int = 1000, steps_per_epoch: int = 50, lr: float = 2e-3, weight_decay: float = 1e-4,
                 max_minutes: float | None = None, seed: int = 0):
        if steps < 1 or steps_per_epoch < 1:
            raise ValueError("steps and steps_per_epoch must be >= 1")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.steps, self.steps_per_epoch, self.lr = int(steps), int(steps_per_epoch), float(lr)
        self.weight_decay, self.max_minutes, self.seed = float(weight_decay), max_minutes, int(seed)

    def to_dict(self) -> dict:
        return dict(vars(self))


def _state_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def train_loop(
    net: torch.nn.Module,
    batches: Iterator[dict],
    step_fn: Callable[[torch.nn.Module, dict, float], tuple[torch.Tensor, dict]],
    run_dir: str | Path,
    config: TrainConfig,
    validate: Callable[[torch.nn.Module], dict] | None = None,
    resume: bool = False,
    device: torch.device | str = "cpu",
    desc: str = "train",
    show_progress: bool = True,
) -> dict:
    """Train ``net``; return a summary (steps done, last losses, best validation, minutes).

    Args:
        net: the network (moved to ``device``).
        batches: endless iterator of batches (dicts of tensors on CPU).
        step_fn: ``(net, batch, progress) -> (loss, logs)``; ``progress`` is the fraction of
            training done (for loss schedules).
        run_dir: folder for ``log.jsonl``, ``last.pt`` and ``best.pt``.
        config: :class:`TrainConfig`.
        validate: ``net -> {"dice": float, ...}`` run after each epoch (net in eval mode).
        resume: continue from ``run_dir/last.pt`` if present.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    net.to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(s / config.steps, 1.0))))
    step, best = 0, -1.0
    last = run_dir / "last.pt"
    if resume and last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=False)
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        step, best = int(state["step"]), float(state["best"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
    else:
        seed_everything(config.seed)
    start = time.monotonic()
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=desc, unit="step", dynamic_ncols=True)
    logs_sum: dict[str, float] = {}
    n_sum = 0
    stopped_early = False
    try:
        while step < config.steps:
            net.train()
            batch = next(batches)
            loss, logs = step_fn(net, batch, step / config.steps)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            optimiser.step()
            schedule.step()
            step += 1
            logs = {"loss": float(loss.detach()), **logs}
            for k, v in logs.items():
                logs_sum[k] = logs_sum.get(k, 0.0) + float(v)
            n_sum += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
            over_time = config.max_minutes is not None and (time.monotonic() - start) / 60 > config.max_minutes
            if step % config.steps_per_epoch == 0 or step == config.steps or over_time:
                record = {"epoch": math.ceil(step / config.steps_per_epoch), "step": step,
                          **{k: round(v / max(n_sum, 1), 5) for k, v in logs_sum.items()},
                          "lr": schedule.get_last_lr()[0], "minutes": round((time.monotonic() - start) / 60, 2)}
                logs_sum, n_sum = {}, 0
                if validate is not None:
                    net.eval()
                    record.update({f"val_{k}": round(float(v), 5) for k, v in validate(net).items()})
                improved = validate is not None and record.get("val_dice", -1.0) > best
                if improved:
                    best = record["val_dice"]
                state = {"net": net.state_dict(), "optimiser": optimiser.state_dict(), "schedule": schedule.state_dict(),
                         "step": step, "best": best, "torch_rng": torch.get_rng_state(),
                         "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}
                atomic_write_bytes(last, _state_bytes(state))
                if improved:
                    atomic_write_bytes(run_dir / "best.pt", _state_bytes({"net": net.state_dict(), "step": step, "best": best}))
                with open(run_dir / "log.jsonl", "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                if bar is not None:
                    bar.write(json.dumps(record))
                if over_time:
                    stopped_early = True
                    break
    finally:
        if bar is not None:
            bar.close()
    return {"steps": step, "best_val_dice": best, "stopped_early": stopped_early,
            "minutes": round((time.monotonic() - start) / 60, 2)}

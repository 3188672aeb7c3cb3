"""A small LoRA training loop: AdamW, linear warm-up then linear decay, gradient accumulation,
held-out loss at regular steps, a progress bar that shows the loss.

Small on purpose (transformers' Trainer pulls in far more than LoRA needs): every step is
visible here, and the loop is the same on a CPU and on CUDA.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tasks.errors import StageError
from tasks.tune.examples import collate


@dataclass(frozen=True)
class Schedule:
    max_steps: int
    batch_size: int
    grad_accum: int
    learning_rate: float
    warmup_steps: int
    eval_every: int
    seed: int

    def lr_at(self, step: int) -> float:
        """Linear warm-up over warmup_steps, then linear decay to zero at max_steps."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / self.warmup_steps
        remaining = self.max_steps - step
        return self.learning_rate * remaining / max(1, self.max_steps - self.warmup_steps)


@dataclass
class History:
    train: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss)
    heldout: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


Row = tuple[list[int], list[int]]


def batches(rows: list[Row], size: int, seed: int) -> Iterator[list[Row]]:
    """Endless batches, reshuffled every epoch."""
    order = list(range(len(rows)))
    rng = random.Random(seed)
    while True:
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [rows[j] for j in order[i : i + size]]


def heldout_loss(model: Any, rows: list[Row], pad: int, batch_size: int, device: Any) -> float:
    """Mean loss per answer token over the held-out rows, in eval mode without gradients."""
    import torch

    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad).items()}
            count = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * count
            tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def train(
    model: Any,
    train_rows: list[Row],
    eval_rows: list[Row],
    schedule: Schedule,
    pad: int,
    device: Any,
    progress: Callable[[Iterable[int]], Any],
    check_first_step: Callable[[], None] = lambda: None,
) -> History:
    import torch

    if len(train_rows) < schedule.batch_size:
        raise StageError(
            f"{len(train_rows)} training examples, fewer than batch_size {schedule.batch_size}",
            "lower batch_size or add data",
        )
    torch.manual_seed(schedule.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule.learning_rate, weight_decay=0.0)
    feed = batches(train_rows, schedule.batch_size, schedule.seed)
    history = History()
    model.train()
    started = time.perf_counter()
    bar = progress(range(schedule.max_steps))
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr_at(step)
        loss_sum = 0.0
        for _ in range(schedule.grad_accum):
            batch = {k: v.to(device) for k, v in collate(next(feed), pad).items()}
            loss = model(**batch).loss / schedule.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        if step == 0:
            check_first_step()  # gradients are there to inspect only before the update
        if not math.isfinite(loss_sum):
            raise StageError(
                f"the training loss became {loss_sum} at step {step + 1}", "lower learning_rate"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.train.append((step + 1, round(loss_sum, 5)))
        postfix = {"loss": f"{loss_sum:.3f}"}
        done = step + 1
        if eval_rows and (done % schedule.eval_every == 0 or done == schedule.max_steps):
            value = heldout_loss(model, eval_rows, pad, schedule.batch_size, device)
            history.heldout.append((done, round(value, 5)))
            postfix["heldout"] = f"{value:.3f}"
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(postfix, refresh=False)  # shown at tqdm's own pace
    history.seconds = time.perf_counter() - started
    model.eval()
    return history

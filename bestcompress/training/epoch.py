"""One training epoch of a Run: seeded data order and encoding noise, forward (teacher from its cache when there
is one), loss, backward, clipping, optimizer and schedule steps, neuron resets; it stops at the first non-finite
loss or gradient with one sentence naming the epoch and step."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext

import torch

from ..errors import ModelError
from ..nn.bf16 import binary_bf16
from .distributed import all_reduce_sum, shard_indices
from .grad_clip import clip_grad_norm
from .outputs import mean_logits, select_logits
from .progress import EpochProgress


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


def _diverged(run, epoch: int, step: int, what: str) -> ModelError:
    last = run.last_path
    if epoch > 1 and last is not None and last.exists():  # written after every epoch: it holds epoch - 1
        kept = f"the last good checkpoint '{last}' (epoch {epoch - 1}) is kept"
    else:
        kept = "no checkpoint was written"
    return ModelError(f"Training stopped at epoch {epoch}, step {step}: {what} is not finite and {kept}; lower "
                      "train.lr or check the data.")


def train_epoch(run, epoch: int, taps) -> dict:
    """Train epoch `epoch` (0-based) of `run`; returns the epoch's summed training statistics over ranks."""
    model, data, info, dev, recipe = run.model, run.data, run.info, run.device, run.recipe
    n_train = len(data.train)
    torch.manual_seed(epoch_seed(run.seed, epoch))  # any in-model randomness (dropout) is per-epoch seeded
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(epoch_seed(run.seed, epoch)))
    idx = shard_indices(perm, info)
    enc_gen = torch.Generator().manual_seed(run.seed * 100_003 + epoch * 1_009 + info.rank + 7)
    x_all, y_all = data.train.tensors
    run.net.train()
    bf16 = recipe.train.precision == "bf16" and dev.type == "cpu"  # binary layers on bf16 products (nn/bf16.py)
    sums = {"loss": 0.0, "correct": 0.0, "count": 0.0}
    part_sums: dict[str, float] = {}
    t0 = time.perf_counter()
    with EpochProgress(run.show_bar, f"epoch {epoch + 1}/{run.epochs}", run.steps) as bar:
        for step in range(run.steps):
            sel = idx[step * run.per_rank_batch:(step + 1) * run.per_rank_batch]
            if len(sel) == 0:
                break
            x = data.encode(x_all[sel], enc_gen).to(dev, non_blocking=True)
            y = y_all[sel].to(dev)
            if taps is not None:
                taps.clear()
            autocast = torch.autocast("cuda", dtype=torch.bfloat16) if run.amp else nullcontext()
            with autocast, binary_bf16(bf16):
                t_logits = None
                if run.teacher_cache is not None:
                    t_logits = run.teacher_cache.logits(sel)
                elif run.uses_teacher:
                    with torch.no_grad():
                        t_logits = mean_logits(run.teacher(x), run.two_heads_teacher, run.teacher, len(y))
                out = select_logits(run.net(x), run.two_heads, run.model, len(y))
                loss, parts = run.loss_fn(out, y, teacher_logits=t_logits,
                                          student_features=taps.student if taps is not None else None,
                                          teacher_features=taps.teacher if taps is not None else None)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise _diverged(run, epoch + 1, step + 1, f"the loss ({loss_value})")
            run.optimizer.zero_grad(set_to_none=True)
            with binary_bf16(bf16):  # recomputations in backward (train.memory) compute as the forward did
                loss.backward()
            if recipe.train.grad_clip > 0:
                norm = clip_grad_norm(model.parameters(), recipe.train.grad_clip)
                if not torch.isfinite(norm):
                    raise _diverged(run, epoch + 1, step + 1, "the gradient norm")
            run.optimizer.step()
            run.scheduler.step()
            if run.reset:
                run.reset()
            if run.teacher_reset and run.teacher_cache is None:
                run.teacher_reset()
            n = float(len(sel))
            sums["loss"] += loss_value * n
            logits = out if isinstance(out, torch.Tensor) else (out[0].float() + out[1].float()) / 2
            sums["correct"] += float((logits.argmax(-1) == y).sum())
            sums["count"] += n
            for k, v in parts.items():
                if k != "total":
                    part_sums[k] = part_sums.get(k, 0.0) + v * n
            bar.update(loss=sums["loss"] / sums["count"], acc=100 * sums["correct"] / sums["count"],
                       lr=run.optimizer.param_groups[0]["lr"],
                       rate=sums["count"] * info.world_size / (time.perf_counter() - t0))
    train_time = time.perf_counter() - t0
    keys = sorted(part_sums)
    reduced = all_reduce_sum([sums["loss"], sums["correct"], sums["count"]] + [part_sums[k] for k in keys], info, dev)
    count = max(reduced[2], 1.0)
    return {"train_loss": reduced[0] / count, "train_top1": 100.0 * reduced[1] / count,
            **{f"train_{k}": reduced[3 + i] / count for i, k in enumerate(keys)},
            "lr": run.optimizer.param_groups[0]["lr"], "samples_per_s": reduced[2] / max(train_time, 1e-9),
            "epoch_time_s": train_time}

"""The end of an epoch: re-estimate the BatchNorm statistics (distill with calibration on), score it on the
validation and test sets, keep the best epoch (picked on validation, never on test; ties go to the later epoch), write last.pt and the
metrics line, print the epoch line; at the end of the run, the model takes the best epoch's weights."""
from __future__ import annotations

from .distributed import barrier
from .evaluation import evaluate_split
from .run_state import append_metrics, save_run_checkpoint


def end_epoch(run, epoch: int, stats: dict) -> dict:
    """Record epoch `epoch` (0-based) of `run` after training it; returns its metrics record."""
    model, info = run.model, run.info
    if run.kind == "distill" and run.recipe.train.calibrate_batches > 0:  # statistics of the weights as they are
        from .calibration import refresh_batchnorm
        refresh_batchnorm(model, run.data, batches=run.recipe.train.calibrate_batches,
                          batch_size=run.per_rank_batch, seed=run.seed, device=run.device)
    val = (evaluate_split(model, run.data, run.device, info, run.limit_batches, amp=run.amp, split="val")
           if run.data.val is not None else None)
    test = evaluate_split(model, run.data, run.device, info, run.limit_batches, amp=run.amp, split="test")
    if val is None:  # no validation set: the last epoch is the one kept
        run.best = {"epoch": epoch + 1, "val_top1": None, "model": None}
    elif run.best.get("val_top1") is None or val["top1"] >= run.best["val_top1"]:
        # a tie goes to the later epoch: it has trained longer at a lower learning rate (a validation split of a
        # few hundred samples ties often: its top-1 moves in steps of 1/n)
        run.best = {"epoch": epoch + 1, "val_top1": val["top1"],
                    "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
    record = {"epoch": epoch + 1, **{k: v for k, v in stats.items() if k not in ("samples_per_s", "epoch_time_s")},
              **({f"val_{k}": v for k, v in val.items() if k != "n"} if val is not None else {}),
              **{f"test_{k}": v for k, v in test.items() if k != "n"},
              "best_epoch": run.best["epoch"], "best_val_top1": run.best["val_top1"],
              "samples_per_s": stats["samples_per_s"], "epoch_time_s": stats["epoch_time_s"]}
    run.history.append(record)
    if info.is_main and run.run_dir is not None:
        save_run_checkpoint(run.last_path, kind=run.kind, epoch=epoch + 1, model_state=model.state_dict(),
                            optimizer=run.optimizer, scheduler=run.scheduler, best=run.best, options=run.options,
                            world_size=info.world_size)
        append_metrics(run.metrics_path, record)
    heads = (f" (head {test['top1_head']:.2f}%, head2 {test['top1_head2']:.2f}%)" if "top1_head" in test else "")
    val_text = f"  val {val['top1']:.2f}%" if val is not None else ""
    run.say(f"epoch {epoch + 1}/{run.epochs}  loss {record['train_loss']:.4f}  train {record['train_top1']:.2f}%"
            f"{val_text}  test {test['top1']:.2f}%{heads}  lr {record['lr']:.2e}  "
            f"{record['samples_per_s']:.0f} samples/s")
    barrier(info)
    return record


def keep_best(run) -> None:
    """Load the best epoch's weights into the model (kept only when a validation set picked them)."""
    state = run.best.get("model")
    if state is not None:
        run.model.load_state_dict(state)

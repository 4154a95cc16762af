"""The per-epoch progress bar (rich): loss, accuracy, learning rate and samples/s; silent when disabled."""
from __future__ import annotations


class EpochProgress:
    """`with EpochProgress(enabled, "epoch 1/10", steps) as bar: bar.update(loss=.., acc=.., lr=.., rate=..)`."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled = bool(enabled)
        self.description = description
        self.total = total
        self._progress = None
        self._task = None

    def __enter__(self) -> "EpochProgress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:5.1f}%  lr {task.fields[lr]:.2e}  "
                           "{task.fields[rate]:.0f} samples/s"),
                TimeElapsedColumn(), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, loss=0.0, acc=0.0, lr=0.0,
                                                 rate=0.0)
        return self

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, **fields)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

"""Training commands: train (a full-precision teacher), distill (CIE), evaluate. Thin wrappers over
bestcompress.training.trainer; under torchrun (`python -m bestcompress ...`) only rank 0 prints and writes."""
from __future__ import annotations

import os
from pathlib import Path

import click

from ..errors import ModelError
from .core import PATH, _console, _say, parse_model_kwargs


def _rank0() -> bool:
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def _data_options(f):
    for decorator in reversed([
        click.option("--data", required=True, metavar="NAME|PATH",
                     help="digits, mnist1d, synthetic, an image folder (one sub-folder per class) or a .npz file."),
        click.option("--encoding", type=click.Choice(["direct", "poisson"]), default="direct", show_default=True,
                     help="direct: the static sample (repeated over T by the model); poisson: rate-coded spikes."),
        click.option("--subset", type=click.IntRange(min=1), help="Use only N training and N test samples."),
        click.option("--limit-batches", type=click.IntRange(min=1), help="At most N batches per epoch (quick runs)."),
        click.option("--device", help="cpu, cuda, cuda:1, ... [default: cuda when available]."),
    ]):
        f = decorator(f)
    return f


def _run_options(f):
    for decorator in reversed([
        click.option("--epochs", type=click.IntRange(min=1), help="Epochs [default: the recipe's train.epochs]."),
        click.option("--recipe", help="Recipe name or YAML path (its train and distill sections are used)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a recipe key, e.g. --set train.lr=1e-3 (repeatable)."),
        click.option("--seed", type=int, help="Seed of data order and encoding [default: the recipe's train.seed]."),
        click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Folder for last.pt and metrics.jsonl [default: runs/<name>]."),
        click.option("--resume", type=PATH, help="Continue exactly from a run's last.pt."),
        click.option("--progress/--no-progress", default=None, help="Progress bar [default: in a terminal]."),
    ]):
        f = decorator(f)
    return f


def _check_output(output: Path) -> None:
    if not output.parent.is_dir():
        raise ModelError(f"Cannot write '{output}': the folder '{output.parent}' does not exist.")


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _log(console):
    return lambda line: _say(console, line)


def _print_eval(console, name: str, result: dict) -> None:
    _say(console, f"{name}: top-1 {result['top1']:.2f}% on {result['n']} test samples")
    if "top1_head" in result:
        _say(console, f"  head (last attention stream): {result['top1_head']:.2f}%   "
                      f"head2 (last MLP stream): {result['top1_head2']:.2f}%")


# --------------------------------------------------------------------------------------------------- train

@click.command()
@click.option("--arch", help="Zoo architecture to build (see `bestcompress zoo`).")
@click.option("--model", "model_factory", metavar="FILE.py:FN", help="Build the model with your own function.")
@click.option("--model-kwargs", metavar="JSON|k=v,...", help="Options for --arch or --model, e.g. embed_dims=64,T=2.")
@click.option("--tiny", is_flag=True, help="Start from the zoo entry's tiny configuration (CPU tests).")
@click.option("--init", "init_checkpoint", type=PATH, help="Start from these weights instead of random ones.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled Python objects in --init (trusted files only).")
@_data_options
@_run_options
@click.option("-o", "--output", type=PATH, help="Output checkpoint [default: <arch>_fp.pt].")
def train(arch, model_factory, model_kwargs, tiny, init_checkpoint, trust_checkpoint, data, encoding, subset,
          limit_batches, device, epochs, recipe, overrides, seed, run_dir, resume, progress, output):
    """Train a full-precision model (the teacher) and save it as a bestcompress checkpoint."""
    from ..checkpoint import load_model
    from ..training.trainer import train as run_train
    from ..recipe import load_recipe, parse_overrides

    if arch is None and model_factory is None and init_checkpoint is None:
        raise ModelError("Give the model to train: --arch NAME (see `bestcompress zoo`), --model FILE.py:FN or "
                         "--init CHECKPOINT.")
    resolved = load_recipe(recipe or "bestformer", parse_overrides(overrides))
    kwargs = parse_model_kwargs(model_kwargs)
    if tiny:
        if arch is None:
            raise ModelError("--tiny needs --arch.")
        from ..zoo import get_entry
        kwargs = {**get_entry(arch).tiny_cfg, **kwargs}
    if encoding == "poisson" and arch is not None and "input_mode" not in kwargs:
        kwargs["input_mode"] = "events"  # Poisson spikes are [B, T, ...] frames
    name = arch or (Path(model_factory).stem if model_factory else Path(init_checkpoint).stem)
    output = output or Path(f"{name.split(':')[0]}_fp.pt")
    _check_output(output)
    run_dir = run_dir or (resume.parent if resume else Path("runs") / output.stem)
    model = load_model(init_checkpoint, arch=arch, model=model_factory, model_kwargs=kwargs, trust=trust_checkpoint)
    console = _console()
    result = run_train(model, data, resolved, output, epochs=epochs, run_dir=run_dir, resume=resume,
                       encoding=encoding, subset=subset, limit_batches=limit_batches, seed=seed, progress=progress,
                       device=device, log=_log(console))
    _report_run(console, f"Trained {name}", result, output, run_dir)


def _report_run(console, what: str, result, output, run_dir) -> None:
    """On rank 0: the final test accuracy of a training run and where its files are."""
    if not _rank0():
        return
    final = result.final
    if final:
        _say(console, f"{what} for {_epochs(final['epoch'])}: test top-1 {final['test_top1']:.2f}% "
                      f"(best {result.best_top1:.2f}%)")
    _say(console, f"Saved {output} (run folder {run_dir})")


# ------------------------------------------------------------------------------------------------- distill

@click.command()
@click.argument("checkpoint", type=PATH)
@click.option("--teacher", type=PATH, help="Teacher checkpoint [default: the full-precision model CHECKPOINT was "
                                           "made from].")
@click.option("--teacher-arch", help="Zoo architecture of --teacher (when it cannot be detected).")
@click.option("--teacher-model", metavar="FILE.py:FN", help="Build the teacher with your own function.")
@click.option("--teacher-kwargs", metavar="JSON|k=v,...", help="Options for --teacher-arch or --teacher-model.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled Python objects (trusted files only).")
@_data_options
@_run_options
@click.option("-o", "--output", type=PATH, help="Output checkpoint [default: <checkpoint stem>_cie.pt].")
def distill(checkpoint, teacher, teacher_arch, teacher_model, teacher_kwargs, trust_checkpoint, data, encoding,
            subset, limit_batches, device, epochs, recipe, overrides, seed, run_dir, resume, progress, output):
    """Recover a binary model's accuracy with CIE (reversible couplings + distillation from the teacher)."""
    from ..checkpoint import load_binary, load_model
    from ..training.trainer import distill as run_distill
    from ..recipe import load_recipe, parse_overrides

    output = output or checkpoint.with_name(f"{checkpoint.stem}_cie.pt")
    _check_output(output)
    run_dir = run_dir or (resume.parent if resume else Path("runs") / checkpoint.stem)
    student, source, info = load_binary(checkpoint, trust=trust_checkpoint)
    resolved = load_recipe(recipe or info["recipe"], parse_overrides(overrides))
    if teacher is None and (teacher_arch is not None or teacher_model is not None):
        raise ModelError("--teacher-arch/--teacher-model need the teacher's weights: add --teacher FILE.")
    if teacher is not None:
        teacher_net = load_model(teacher, arch=teacher_arch, model=teacher_model,
                                 model_kwargs=parse_model_kwargs(teacher_kwargs), trust=trust_checkpoint)
    else:
        teacher_net = source
    console = _console()
    result = run_distill(student, teacher_net, data, resolved, output, source_model=source, epochs=epochs,
                         run_dir=run_dir, resume=resume, encoding=encoding, subset=subset,
                         limit_batches=limit_batches, seed=seed, progress=progress, device=device, log=_log(console))
    _report_run(console, f"Distilled {checkpoint}", result, output, run_dir)


# ------------------------------------------------------------------------------------------------ evaluate

@click.command()
@click.argument("file", type=PATH)
@click.option("--arch", help="Zoo architecture (for checkpoints that are not bestcompress files).")
@click.option("--model", "model_factory", metavar="FILE.py:FN", help="Build the model with your own function.")
@click.option("--model-kwargs", metavar="JSON|k=v,...", help="Options for --arch or --model.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled Python objects (trusted files only).")
@_data_options
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def evaluate(file, arch, model_factory, model_kwargs, trust_checkpoint, data, encoding, subset, limit_batches,
             device, batch_size, as_json):
    """Top-1 accuracy of a binary or full-precision checkpoint on a data set's test split."""
    import json

    from ..checkpoint import load_any
    from ..training.trainer import evaluate as run_evaluate

    kind, net, info = load_any(file, trust=trust_checkpoint, arch=arch, model=model_factory,
                               model_kwargs=parse_model_kwargs(model_kwargs))
    result = run_evaluate(net, data, encoding=encoding, subset=subset, limit_batches=limit_batches,
                          batch_size=batch_size, device=device)
    if as_json:
        click.echo(json.dumps({"file": str(file), "kind": kind, "data": data, **result}))
        return
    _print_eval(_console(), f"{file} ({'binary' if kind == 'binary' else 'full-precision'}) on {data}", result)


COMMANDS = [train, distill, evaluate]

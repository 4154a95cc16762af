"""Training commands: train (a full-precision teacher), distill (CIE), evaluate. Thin wrappers over
bestcompress.training.trainer; under torchrun (`python -m bestcompress ...`) only rank 0 prints and writes."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import DataError, ModelError
from ..training.distributed import is_main_process
from .core import PATH, _console, _say, parse_model_kwargs
from .options import check_device, threads_option

RESUMABLE = ("recipe", "overrides", "epochs", "seed", "data", "encoding", "subset", "limit_batches")


def _given(**values) -> dict:
    """The run options typed on the command line (None for those left at their defaults): with --resume the
    others come from the run's last.pt, and those given must agree with it."""
    ctx = click.get_current_context()
    out = {}
    for name, value in values.items():
        source = ctx.get_parameter_source(name)
        out[name] = value if source not in (None, click.core.ParameterSource.DEFAULT) else None
    out["overrides"] = parse_overrides_or_none(values.get("overrides"))
    return out


def parse_overrides_or_none(items):
    from ..recipe import parse_overrides
    return parse_overrides(items) if items else None


def _need_data(data, resume) -> None:
    if data is None and resume is None:
        raise DataError("Give the data to train on with --data (digits, mnist1d, synthetic, a folder or a .npz).")


def _data_options(f):
    for decorator in reversed([
        click.option("--data", metavar="NAME|PATH",
                     help="digits, mnist1d, synthetic, an image folder (one sub-folder per class) or a .npz file "
                          "(with --resume: the run's)."),
        click.option("--encoding", type=click.Choice(["direct", "poisson"]), default="direct", show_default=True,
                     help="direct: the static sample (repeated over T by the model); poisson: rate-coded spikes."),
        click.option("--subset", type=click.IntRange(min=1), help="Use only N training and N test samples."),
        click.option("--limit-batches", type=click.IntRange(min=1), help="At most N batches per epoch (quick runs)."),
        click.option("--device", callback=check_device, help="cpu, cuda, cuda:1, ... [default: cuda when available]."),
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
        click.option("--resume", type=PATH, help="Continue exactly from a run's last.pt, with the options it was "
                                                 "started with (options given again must agree)."),
        click.option("--progress/--no-progress", default=None, help="Progress bar [default: in a terminal]."),
    ]):
        f = decorator(f)
    return f


def _check_output(output: Path, run_dir: Path, *inputs) -> None:
    """Before any work: the output is no input, and its folder and the run folder (or its nearest existing
    parent) can be written."""
    from ..fileio import check_output_path, probe_writable
    check_output_path(output, ModelError, inputs=inputs, probe=True)
    folder = Path(run_dir)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.is_dir():
        probe_writable(folder, ModelError)


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
@threads_option
def train(arch, model_factory, model_kwargs, tiny, init_checkpoint, trust_checkpoint, data, encoding, subset,
          limit_batches, device, epochs, recipe, overrides, seed, run_dir, resume, progress, output):
    """Train a full-precision model (the teacher) and save it as a bestcompress checkpoint."""
    from ..loading import load_model
    from ..training.run_state import run_options
    from ..training.trainer import train as run_train

    if arch is None and model_factory is None and init_checkpoint is None:
        raise ModelError("Give the model to train: --arch NAME (see `bestcompress zoo`), --model FILE.py:FN or "
                         "--init CHECKPOINT.")
    _need_data(data, resume)
    given = _given(recipe=recipe, overrides=overrides, epochs=epochs, seed=seed, data=data, encoding=encoding,
                   subset=subset, limit_batches=limit_batches)
    _no_structure_overrides(given["overrides"])
    kwargs = parse_model_kwargs(model_kwargs)
    if tiny:
        if arch is None:
            raise ModelError("--tiny needs --arch.")
        from ..zoo import get_entry
        kwargs = {**get_entry(arch).tiny_cfg, **kwargs}
    stored = run_options(resume, "train") if resume is not None else {}
    if (given["encoding"] or stored.get("encoding")) == "poisson" and arch is not None and "input_mode" not in kwargs:
        kwargs["input_mode"] = "events"  # Poisson spikes are [B, T, ...] frames
    name = arch or (Path(model_factory).stem if model_factory else Path(init_checkpoint).stem)
    output = output or Path(f"{name.split(':')[0]}_fp.pt")
    run_dir = run_dir or (resume.parent if resume else Path("runs") / output.stem)
    from ..building import factory_file
    _check_output(output, run_dir, init_checkpoint, resume, factory_file(model_factory))
    model = load_model(init_checkpoint, arch=arch, model=model_factory, model_kwargs=kwargs, trust=trust_checkpoint)
    console = _console()
    result = run_train(model, given["data"], given["recipe"], output, overrides=given["overrides"],
                       epochs=given["epochs"], run_dir=run_dir, resume=resume, encoding=given["encoding"],
                       subset=given["subset"], limit_batches=given["limit_batches"], seed=given["seed"],
                       progress=progress, device=device, log=_log(console))
    _report_run(console, f"Trained {name}", result, output, run_dir)


def _report_run(console, what: str, result, output, run_dir) -> None:
    """On rank 0: the kept epoch's accuracy (picked on validation) and where the files are."""
    if not is_main_process():
        return
    final, best = result.final, result.best
    if final:
        picked = (f"best epoch {result.best_epoch} by validation top-1 {result.best_top1:.2f}%"
                  if result.best_top1 is not None else f"epoch {result.best_epoch}")
        _say(console, f"{what} for {_epochs(final['epoch'])}: kept {picked}, test top-1 {best['test_top1']:.2f}%")
    _say(console, f"Saved {output} (the kept epoch; run folder {run_dir} holds last.pt, the last epoch)")


# ------------------------------------------------------------------------------------------------- distill

def _no_structure_overrides(items) -> None:
    """`train` builds no binary model: a --set of a structure key would do nothing there, so it is an error."""
    from ..errors import RecipeError
    from ..recipe import STRUCTURE_SECTIONS
    for key in items or {}:
        if key.split(".")[0] in STRUCTURE_SECTIONS:
            raise RecipeError(f"--set {key} does nothing in `train` (it shapes the binary model); give it to "
                              "`bestcompress binarize` instead.")


def _check_structure(built, overrides) -> None:
    """The structure keys (weights, attention, neurons, reversible) were fixed by binarize: a --set asking for
    another value now is an error naming the key, not silently ignored."""
    from ..errors import RecipeError
    from ..recipe import load_recipe, parse_overrides, structure_changes
    items = parse_overrides(overrides)
    if not items:
        return
    asked = load_recipe(built, items)  # the train/distill sections may come from another --recipe; these may not
    changed = [key for key in structure_changes(built, asked) if key in items]
    if changed:
        raise RecipeError(f"'{changed[0]}' cannot change after binarize (it shapes the binary model's structure); "
                          "binarize the full-precision model again with it, or leave it out"
                          f"{f' ({len(changed)} such keys)' if len(changed) > 1 else ''}.")


@click.command()
@click.argument("checkpoint", type=PATH)
@click.option("--model", "model_factory", metavar="FILE.py:FN",
              help="The factory that built CHECKPOINT's source model, when the checkpoint names your own code.")
@click.option("--teacher", type=PATH, help="Teacher checkpoint [default: the full-precision model CHECKPOINT was "
                                           "made from].")
@click.option("--teacher-arch", help="Zoo architecture of --teacher (when it cannot be detected).")
@click.option("--teacher-model", metavar="FILE.py:FN", help="Build the teacher with your own function.")
@click.option("--teacher-kwargs", metavar="JSON|k=v,...", help="Options for --teacher-arch or --teacher-model.")
@click.option("--trust-checkpoint", is_flag=True, help="Allow pickled Python objects (trusted files only).")
@_data_options
@_run_options
@click.option("-o", "--output", type=PATH, help="Output checkpoint [default: <checkpoint stem>_cie.pt].")
@threads_option
def distill(checkpoint, model_factory, teacher, teacher_arch, teacher_model, teacher_kwargs, trust_checkpoint, data,
            encoding, subset, limit_batches, device, epochs, recipe, overrides, seed, run_dir, resume, progress,
            output):
    """Recover a binary model's accuracy with CIE (reversible couplings + distillation from the teacher)."""
    from ..loading import load_binary, load_model
    from ..training.run_state import run_options
    from ..training.trainer import distill as run_distill

    _need_data(data, resume)
    given = _given(recipe=recipe, overrides=overrides, epochs=epochs, seed=seed, data=data, encoding=encoding,
                   subset=subset, limit_batches=limit_batches)
    output = output or checkpoint.with_name(f"{checkpoint.stem}_cie.pt")
    run_dir = run_dir or (resume.parent if resume else Path("runs") / checkpoint.stem)
    from ..building import factory_file
    _check_output(output, run_dir, checkpoint, teacher, resume, factory_file(teacher_model),
                  factory_file(model_factory))
    if teacher is None and (teacher_arch is not None or teacher_model is not None):
        raise ModelError("--teacher-arch/--teacher-model need the teacher's weights: add --teacher FILE.")
    student, source, info = load_binary(checkpoint, trust=trust_checkpoint, model=model_factory)
    _check_structure(info["recipe"], overrides)
    if teacher is None and resume is not None:  # the run's own teacher file, if it had one
        stored = (run_options(resume, "distill").get("teacher") or {}).get("file")
        teacher = Path(stored) if stored else None
    if teacher is not None:
        teacher_net = load_model(teacher, arch=teacher_arch, model=teacher_model,
                                 model_kwargs=parse_model_kwargs(teacher_kwargs), trust=trust_checkpoint,
                                 option="--teacher-model")
        teacher_name, teacher_file = str(teacher), str(teacher)
    else:
        teacher_net, teacher_name, teacher_file = source, f"the full-precision source in {checkpoint}", None
    console = _console()
    result = run_distill(student, teacher_net, given["data"], given["recipe"], output, source_model=source,
                         overrides=given["overrides"], epochs=given["epochs"], run_dir=run_dir, resume=resume,
                         encoding=given["encoding"], subset=given["subset"], limit_batches=given["limit_batches"],
                         seed=given["seed"], progress=progress, device=device, log=_log(console),
                         teacher_name=teacher_name, teacher_file=teacher_file)
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
@threads_option
def evaluate(file, arch, model_factory, model_kwargs, trust_checkpoint, data, encoding, subset, limit_batches,
             device, batch_size, as_json):
    """Top-1 accuracy of a binary or full-precision checkpoint on a data set's test split."""
    import json

    from ..loading import load
    from ..training.trainer import evaluate as run_evaluate

    if data is None:
        raise DataError("Give the data to evaluate on with --data (digits, mnist1d, synthetic, a folder or a .npz).")
    loaded = load(file, trust=trust_checkpoint, arch=arch, model=model_factory,
                  model_kwargs=parse_model_kwargs(model_kwargs))
    kind, net = loaded.kind, loaded.model
    result = run_evaluate(net, data, encoding=encoding, subset=subset, limit_batches=limit_batches,
                          batch_size=batch_size, device=device)
    if as_json:
        click.echo(json.dumps({"file": str(file), "kind": kind, "data": data, **result}))
        return
    _print_eval(_console(), f"{file} ({'full-precision' if kind == 'fp' else kind}) on {data}", result)


COMMANDS = [train, distill, evaluate]

"""Core commands: binarize, inspect, recipes, zoo. Each parses its options, calls one API function, prints."""
from __future__ import annotations

import json
from pathlib import Path

import click
import yaml

from ..errors import BestcompressError, ModelError, short_reason
from .options import threads_option

PATH = click.Path(dir_okay=False, path_type=Path)  # existence is checked by the loaders (one-sentence errors)


# ------------------------------------------------------------------------------------------------- helpers

def _console():
    from rich.console import Console
    return Console()


def _say(console, text: str = "") -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _table(console, headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table in a terminal, aligned plain text when piped."""
    if console.is_terminal:
        from rich.table import Table
        table = Table(title=title)
        for h in headers:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        console.print(table)
        return
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    if title:
        _say(console, title)
    for r in [headers, ["-" * w for w in widths]] + rows:
        _say(console, "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """'3,32,32' (or '3x32x32') -> (3, 32, 32)."""
    if text is None:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ModelError(f"--input-shape expects positive integers separated by commas, such as 3,32,32; "
                         f"got '{text}'.")
    return shape


def parse_model_kwargs(text: str | None) -> dict:
    """A JSON object ('{"num_classes": 100}') or k=v pairs ('num_classes=100,T=2'; values parsed as YAML)."""
    if not text:
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ModelError(f"--model-kwargs is not valid JSON ({e.msg} at character {e.pos}).") from None
        if not isinstance(value, dict):
            raise ModelError("--model-kwargs must be a JSON object such as {\"num_classes\": 100}.")
        return value
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ModelError(f"--model-kwargs expects key=value pairs separated by commas or a JSON object; "
                             f"got '{item}'.")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _model_options(f):
    """Options shared by the commands that build a source model."""
    for decorator in reversed([
        click.option("--arch", help="Zoo architecture (see `bestcompress zoo`); sizes are read from the checkpoint."),
        click.option("--model", "model_factory", metavar="FILE.py:FN",
                     help="Your own model: a factory 'path/to/file.py:fn' or 'package.module:fn' (the only way, "
                          "besides --trust-checkpoint, that code runs)."),
        click.option("--model-kwargs", metavar="JSON|k=v,...", help="Options for --arch or --model."),
        click.option("--input-shape", metavar="C,H,W", help="Per-sample input shape, e.g. 3,32,32."),
        click.option("--trust-checkpoint", is_flag=True,
                     help="Allow pickled Python objects and model factories a file names. Only for files you trust."),
    ]):
        f = decorator(f)
    return f


def recipe_file(recipe) -> Path | None:
    """The YAML file a --recipe names (an input of the command), or None for a registered name."""
    if recipe is None or not isinstance(recipe, (str, Path)):
        return None
    p = Path(recipe)
    return p if p.suffix in (".yaml", ".yml") or p.is_file() else None


def load_source(path, arch=None, model_factory=None, model_kwargs=None, trust=False, option="--model", want=None,
                command="this step"):
    """bc.load with the command line's model options (model_kwargs: the --model-kwargs text)."""
    from ..loading import load
    kwargs = parse_model_kwargs(model_kwargs) if isinstance(model_kwargs, (str, type(None))) else model_kwargs
    return load(path, arch=arch, model=model_factory, model_kwargs=kwargs or None, trust=trust, option=option,
                want=want, command=command)


def load_binary_model(path, trust=False, model_factory=None, model_kwargs=None, command="this command"):
    """A binary model (binary checkpoint or .bcz) through bc.load; a full-precision file is one sentence."""
    return load_source(path, None, model_factory, model_kwargs, trust, want="binary", command=command)


def _check_shape_fits(error: Exception, text: str | None, shape) -> None:
    """After binarize failed on an input of a user-given shape: that shape does not fit (one sentence)."""
    if text is None:
        return
    raise ModelError(f"--input-shape {text} does not fit the model: running it on samples of shape "
                     f"{list(shape)} failed ({short_reason(error, 120).rstrip('.')}).") from None


# ------------------------------------------------------------------------------------------------ binarize

@click.command()
@click.argument("checkpoint", type=PATH)
@_model_options
@click.option("--recipe", default="bestformer", show_default=True, help="Recipe name or YAML path.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
@click.option("-o", "--output", type=PATH, help="Output file [default: <checkpoint stem>_binary.pt].")
@click.option("--calibrate", "calibrate_data", metavar="NAME|PATH",
              help="Calibrate the binary model on training samples of this data set: BatchNorm statistics, "
                   "attention-map scales, heads fitted to the full-precision model's.")
@click.option("--calibrate-batches", type=click.IntRange(min=1), default=8, show_default=True,
              help="Batches of 64 samples for --calibrate.")
@click.option("--fit-heads/--no-fit-heads", default=True, show_default=True,
              help="With --calibrate: fit the full-precision heads to the source model's by least squares.")
@threads_option
def binarize(checkpoint, arch, model_factory, model_kwargs, input_shape, trust_checkpoint, recipe, overrides,
             output, calibrate_data, calibrate_batches, fit_heads):
    """Make a full-precision checkpoint binary (BESTformer) and save it."""
    from ..building import factory_file
    from ..checkpoint import check_finite, save_binary
    from ..convert import binarize as run_binarize
    from ..fileio import check_output_path
    from ..model_facts import model_input_shape
    from ..passes.base import PassError
    from ..recipe import load_recipe, parse_overrides
    from ..summary import summarize

    shape = parse_input_shape(input_shape)
    kwargs = parse_model_kwargs(model_kwargs)
    resolved = load_recipe(recipe, parse_overrides(overrides))  # recipe errors before any heavy work
    output = output or checkpoint.with_name(f"{checkpoint.stem}_binary.pt")
    check_output_path(output, inputs=[checkpoint, factory_file(model_factory), recipe_file(recipe)], probe=True)
    source = load_source(checkpoint, arch, model_factory, kwargs, trust_checkpoint, want="fp",
                         command="binarize").model
    check_finite(source.state_dict(), f"Checkpoint '{checkpoint}'")
    if shape is not None:
        source.bc_input_shape = shape
    elif model_input_shape(source) is None:  # it states no image size, input_shape or default_cfg
        from ..model_facts import input_shape_hint
        raise ModelError(f"The model's input shape is unknown; {input_shape_hint(source)}.")
    if calibrate_data is not None:  # data errors before the work
        from ..data import load_dataset
        calibration = load_dataset(calibrate_data, source, input_shape=shape)
    try:
        result = run_binarize(source, recipe=resolved, input_shape=shape)
    except Exception as e:  # a user-given shape that the model's forward rejects (not a user error of another kind)
        cause = e.__cause__ if isinstance(e, PassError) else e
        if not isinstance(cause, BestcompressError):
            _check_shape_fits(cause, input_shape, shape)
        raise
    if calibrate_data is not None:
        from ..training.calibration import calibrate
        done = calibrate(result.model, calibration, batches=calibrate_batches, batch_size=64,
                         teacher=source if fit_heads else None)
        result.notes.append(f"calibrate: re-estimated {done.note(f'training samples of {calibrate_data!r}')}")
    summary = summarize(result.model, input_shape=shape)
    save_binary(result.model, source, output)
    console = _console()
    _say(console, f"Binarized {checkpoint} with recipe '{resolved.name}':")
    for note in result.notes:
        _say(console, f"  - {note}")
    for line in summary.totals_lines():
        _say(console, f"  {line}")
    _say(console, f"Saved {output}")


# ------------------------------------------------------------------------------------------------- inspect

@click.command()
@click.argument("file", type=PATH)
@_model_options
@click.option("--csv", "as_csv", is_flag=True, help="Print the per-layer table as CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", type=PATH, default=None, metavar="FILE.png",
              help="Also draw the per-layer bars (bits, parameters, MACs, firing rates) into FILE.png.")
@threads_option
def inspect(file, arch, model_factory, model_kwargs, input_shape, trust_checkpoint, as_csv, as_json, plot):
    """Per-layer bits, memory and MACs of a binary, packed (.bcz) or full-precision checkpoint."""
    from ..summary import summarize

    shape = parse_input_shape(input_shape)
    if plot is not None:
        from ..errors import ReportError
        from ..fileio import check_output_path
        check_output_path(plot, ReportError, inputs=[file], probe=True)
    loaded = load_source(file, arch, model_factory, model_kwargs, trust_checkpoint)
    kind, info = ("binary" if loaded.is_binary else "fp"), loaded.info
    summary = summarize(loaded.model, input_shape=shape)
    console = _console()
    if plot is not None:
        from ..report import plot_layers
        plot_layers(loaded.model, plot, input_shape=shape)
        click.echo(f"Wrote the per-layer bars to {plot}", err=as_csv or as_json)
    if as_csv:
        click.echo(summary.to_csv(), nl=False)
        return
    from ..engine.runtime import memory_line, packed_memory  # a .bcz: what the 1-bit engine holds in RAM
    engine_mem = packed_memory(loaded)
    if as_json:
        click.echo(json.dumps({"kind": kind, "spec": info.get("spec"), **summary.to_dict(),
                               **({"engine_memory": engine_mem} if engine_mem else {})}, indent=2, default=str))
        return
    what = {"binary": "binary", "packed": "packed binary"}.get(loaded.kind, "full-precision")
    stored = info.get("recipe")
    name = stored.get("name") if isinstance(stored, dict) else getattr(stored, "name", None)
    recipe = f", recipe '{name}'" if name else ""
    spec = info.get("spec") or {}
    origin = spec.get("arch") or spec.get("factory") or spec.get("pickle") or "unknown"
    _say(console, f"{file}: {what} model ({origin}{recipe})")
    summary.render(console)
    if engine_mem:
        _say(console, memory_line(engine_mem))


# ------------------------------------------------------------------------------------------------- recipes

@click.group(invoke_without_command=True)
@click.pass_context
def recipes(ctx):
    """List the recipes (`recipes show NAME` prints one)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(recipes_list)


@recipes.command("list")
def recipes_list():
    """List the recipes with their descriptions."""
    from ..recipe import list_recipes, load_recipe
    rows = [[name, load_recipe(name).description] for name in list_recipes()]
    _table(_console(), ["recipe", "description"], rows)


@recipes.command("show")
@click.argument("name")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (repeatable).")
def recipes_show(name, overrides):
    """Print a recipe (name or YAML path), fully resolved, as YAML."""
    from ..recipe import load_recipe, parse_overrides
    recipe = load_recipe(name, parse_overrides(overrides))
    click.echo(yaml.safe_dump(recipe.to_dict(), sort_keys=False, width=120), nl=False)


# ----------------------------------------------------------------------------------------------------- zoo

def _param_count(name: str, cfg: dict) -> int:
    import torch
    from ..zoo import create_model
    with torch.device("meta"):  # counts shapes without allocating weights
        model = create_model(name, **cfg)
    return sum(p.numel() for p in model.parameters())


@click.command()
def zoo():
    """The full-precision reference models: name, family, parameters, input shape."""
    from ..zoo import get_entry, list_models
    rows = []
    for name in list_models():
        entry = get_entry(name)
        cfg = entry.resolve()
        tiny = {**entry.default_cfg, **entry.tiny_cfg}
        rows.append([name, entry.family, f"{_param_count(name, {}) / 1e6:.2f} M", f"{_param_count(name, tiny):,}",
                     "x".join(map(str, entry.input_shape(cfg)))])
    _table(_console(), ["model", "family", "params (default)", "params (tiny)", "input"], rows)


COMMANDS = [binarize, inspect, recipes, zoo]

"""Recipes: frozen dataclasses that mirror the YAML keys one to one.

Unknown keys, wrong types and values outside the allowed set are RecipeErrors naming the file and the key.
`--set a.b=c` overrides any key (the value is parsed as YAML: `--set weights.binarize=false`).
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import RecipeError, short_reason

RECIPE_DIR = Path(__file__).resolve().parent / "recipes"
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class WeightsConfig:
    binarize: bool = True
    quantizer: Literal["sign", "sign_scaled"] = "sign"  # sign: W_b in {-1,+1}; sign_scaled: alpha_c*sign
    keep_full_precision: tuple[str, ...] = ("first", "heads")  # 'first', 'heads' or fnmatch name patterns
    channels_last: bool = True  # binary Conv2d train on channels-last memory on CPU (passes/channels_last.py)


@dataclass(frozen=True)
class AttentionConfig:
    binarize: bool = True
    map: Literal["auto", "qk", "kv"] = "auto"  # auto keeps the model's own association
    v_threshold: float = 1.0
    tau: float = 2.0
    learnable_scale: bool = True  # the lambda of shape [T, 1, heads, 1, 1]
    softmax: Literal["error", "replace"] = "error"


@dataclass(frozen=True)
class NeuronsConfig:
    canonicalize: bool = True  # third-party neurons -> bestcompress LIF (verified equal)


@dataclass(frozen=True)
class ReversibleConfig:
    enabled: bool = True
    eval_heads: Literal["mean", "head", "head2"] = "mean"
    form: Literal["preserving", "paper"] = "preserving"  # learnable a, b from (0, 1) | the paper's fixed ½, ½
    stages: tuple[str, ...] = ()  # trunk stages to couple, by index or module prefix; empty: all
    stream_bits: Optional[int] = None  # None: float streams | n: each coupling's output on a signed n-bit 2^e grid


@dataclass(frozen=True)
class DistillConfig:
    losses: tuple[Literal["hard", "soft", "feature", "attention"], ...] = ()  # KNOWN_LOSSES; () = CE only (measured best)
    alpha: float = 0.5
    temperature: float = 2.0
    feature_weight: float = 1.0
    attention_weight: float = 1.0  # the attention-relation loss
    heads: Literal["split", "both"] = "both"  # both: each head gets CE and KD | split: CE on head, KD on head2 (DeiT)
    label_smoothing: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-5
    weight_decay: float = 0.06
    warmup_epochs: int = 2
    grad_clip: float = 1.0
    seed: int = 0
    val_fraction: float = 0.1  # part of the training set held out to pick the best epoch (0: keep the last)
    calibrate_batches: int = 8  # distill re-estimates BatchNorm statistics on this many batches first (0: off)
    fit_heads: bool = False  # calibration also fits the FP heads to the FP model's heads (least squares)
    memory: Literal["plain", "checkpoint", "reversible"] = "plain"  # backprop memory (training/memory.py)
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: binary layers on bf16 products where exact (nn/bf16.py)


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    description: str = ""
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    neurons: NeuronsConfig = field(default_factory=NeuronsConfig)
    reversible: ReversibleConfig = field(default_factory=ReversibleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with dotted-key overrides applied, e.g. replace(**{"weights.binarize": False})."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value, "<override>")
        return recipe_from_dict(data, source="<override>")


def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return "a list"
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(f"{where} must be {_type_name(tp)}, got {value!r}.")
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {type(value).__name__} {value!r}.")
        item_tp = typing.get_args(tp)[0]
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {value!r}.")
        if not math.isfinite(value):
            raise RecipeError(f"{where} must be a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {value!r}.")
        return value
    raise TypeError(f"unsupported recipe type {tp}")


def _build(cls, data: Any, source: str, prefix: str):
    where = f"{source}: key '{prefix}'" if prefix else source
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}.")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise RecipeError(f"{source}: unknown key '{key}' (allowed here: {', '.join(sorted(names))}).")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{prefix}.{name}" if prefix else name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, source, key)
        else:
            kwargs[name] = _coerce(value, tp, f"{source}: key '{key}'")
    return cls(**kwargs)


# Allowed values of numeric keys: (lowest, lowest allowed itself, highest or None, highest allowed itself).
LIMITS: dict[str, tuple] = {
    "train.lr": (0, False, None, False),
    "train.min_lr": (0, True, None, False),
    "train.batch_size": (1, True, None, False),
    "train.epochs": (1, True, None, False),
    "train.warmup_epochs": (0, True, None, False),
    "train.weight_decay": (0, True, None, False),
    "train.grad_clip": (0, True, None, False),
    "distill.alpha": (0, True, 1, True),
    "distill.temperature": (0, False, None, False),
    "distill.feature_weight": (0, True, None, False),
    "distill.label_smoothing": (0, True, 1, False),
    "attention.v_threshold": (0, False, None, False),
    "attention.tau": (0, False, None, False),
    "distill.attention_weight": (0, True, None, False),
    "train.val_fraction": (0, True, 1, False),
    "train.calibrate_batches": (0, True, None, False),
}


def _limit_text(lo, lo_in, hi, hi_in) -> str:
    low = f"{'>=' if lo_in else '>'} {lo}"
    return low if hi is None else f"{low} and {'<=' if hi_in else '<'} {hi}"


def validate(recipe: "Recipe", source: str) -> "Recipe":
    """Check every numeric key against LIMITS; a value outside is a RecipeError naming the file and the key."""
    plain = recipe.to_dict()
    for key, (lo, lo_in, hi, hi_in) in LIMITS.items():
        section, name = key.split(".")
        if name not in plain.get(section, {}):
            continue
        value = plain[section][name]
        ok = (value >= lo if lo_in else value > lo) and (hi is None or (value <= hi if hi_in else value < hi))
        if not ok:
            raise RecipeError(f"{source}: key '{key}' must be {_limit_text(lo, lo_in, hi, hi_in)}, got {value!r}.")
    bits = recipe.reversible.stream_bits
    if bits is not None and not 2 <= bits <= 16:
        raise RecipeError(f"{source}: key 'reversible.stream_bits' must be null (a float stream) or an integer "
                          f"from 2 to 16, got {bits!r}.")
    if bits is not None and recipe.train.memory == "reversible":
        raise RecipeError(f"{source}: reversible.stream_bits quantizes the coupled streams, so train.memory "
                          "reversible cannot rebuild them exactly; use train.memory plain or checkpoint.")
    return recipe


def recipe_from_dict(data: dict, source: str = "<dict>") -> Recipe:
    return validate(_build(Recipe, data, source, ""), source)


STRUCTURE_SECTIONS = ("neurons", "attention", "reversible", "weights")  # fixed once binarize has built the model


def structure_changes(built: "Recipe | dict", asked: "Recipe") -> list[str]:
    """Dotted keys of the structure sections where `asked` differs from the recipe a model was `built` with."""
    before = built.to_dict() if isinstance(built, Recipe) else dict(built)
    after = asked.to_dict()
    changed = []
    for section in STRUCTURE_SECTIONS:
        old, new = before.get(section) or {}, after.get(section) or {}
        changed += [f"{section}.{k}" for k in new if k in old and old[k] != new[k]]
    return changed


def _set_dotted(data: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise RecipeError(f"{source}: unknown key '{key}'.")
        node = node[p]
    if parts[-1] not in node:
        raise RecipeError(f"{source}: unknown key '{key}'.")
    node[parts[-1]] = value


def parse_overrides(items: typing.Iterable[str]) -> dict[str, Any]:
    """['a.b=1', ...] -> {'a.b': 1}; values are parsed as YAML scalars or lists."""
    out = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got '{item}'.")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            hint = " (a list is written [a, b])" if raw.lstrip().startswith(("[", "{")) else ""
            raise RecipeError(f"--set {key.strip()}: the value '{raw}' is not valid YAML{hint}; "
                              f"{short_reason(e, 80).rstrip('.')}.") from None
    return out


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise RecipeError(f"Recipe file '{p}' does not exist.")
        return p
    candidate = RECIPE_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise RecipeError(f"Unknown recipe '{name_or_path}' (known: {', '.join(list_recipes())}; "
                          "or give a path to a .yaml file).")
    return candidate


def load_recipe(name_or_path: str | Path | Recipe | None = "bestformer",
                overrides: Optional[dict[str, Any]] = None) -> Recipe:
    """A recipe by registered name or YAML path, with dotted overrides applied.

    Args:
        name_or_path: a name from `list_recipes()`, a .yaml path, or a Recipe (returned with overrides).
        overrides: {'weights.binarize': False, ...}.
    Returns:
        The validated, frozen Recipe.
    """
    if isinstance(name_or_path, Recipe):
        return name_or_path.replace(**overrides) if overrides else name_or_path
    if name_or_path is None:
        name_or_path = "bestformer"
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({short_reason(e)}).") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys, got {type(data).__name__}.")
    data.setdefault("name", path.stem)
    recipe = recipe_from_dict(data, source=str(path))
    if overrides:
        plain = recipe.to_dict()
        for key, value in overrides.items():
            _set_dotted(plain, key, value, f"{path} (--set)")
        recipe = recipe_from_dict(plain, source=f"{path} (--set)")
    return recipe

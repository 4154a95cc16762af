"""The public spiking transformers as their authors wrote them, through the real CLI (issue 10's separate check).

Nothing of the public code is vendored. `--root DIR` points at a folder holding, per family, the repository's files
at their repository paths (a `git clone` of each repository into DIR/<family> is fine):

    spikformer/        github.com/ZK-Zhou/spikformer                 cifar10/model.py, imagenet/model.py, cifar10dvs/model.py
    sdt_v1/            github.com/BICLab/Spike-Driven-Transformer    model/*.py, module/*.py
    qkformer/          github.com/zhouchenlin2096/QKFormer           cifar10/model.py, imagenet/qkformer.py, cifar10-dvs/model.py
    sdt_v2/            github.com/BICLab/Spike-Driven-Transformer-V2 classification/models.py
    bestformer/        github.com/CaoHLin/BESTFormer                 cifar/model.py, cifar/quantized_utils.py
    spikingformer/     github.com/zhouchenlin2096/Spikingformer      cifar10/model.py, imagenet/model.py, cifar10-dvs/model.py
    spikingformer_cml/ github.com/zhouchenlin2096/Spikingformer-CML  cifar10/model.py, cifar10/CML_Spikformer.py
    spikingresformer/  github.com/xyshi2000/SpikingResformer         models/spikingresformer.py, models/submodules/*.py,
                                                                     models/__init__.py

For every row found there it runs, as a user would, in a scratch folder (one `python -m bestcompress` child each):
the authors' builder with a small config saves a timm-style checkpoint ({'state_dict': ...}, as their train.py
does); `inspect --json` of it (FP MACs, head MACs); `binarize --model FILE:FN` with the family recipe and with
`bestformer` (without --input-shape first: the shape should be inferred); `inspect --json` of the binary model
(MACs <= FP + second head, every binarized layer 1-bit); one eval forward through `bc.load` checking that each
attention-map neuron emits only {0, 1}; `distill` one step on synthetic data at the model's input shape; `export`
qonnx and onnx (each verified against PyTorch by the CLI before it writes).

The public code imports timm, spikingjelly's `clock_driven` package (spikingjelly <= 0.0.0.0.14; 2.0, installed
here, renamed it `activation_based`; SpikingResformer passes 0.0.0.0.14's `backend=` to its neurons, which 2.0
lacks), einops and torchinfo. `--shim` writes stand-ins for whichever of those are missing into a temporary folder
put on the children's PYTHONPATH (benchmarks/stand_ins.py says what each stands in for, as does the JSON). The
model files' own folders are not put on the path: a sibling import such as `from quantized_utils import ...`, or a
package's relative `from .submodules.layers import ...`, must work through bestcompress itself.

    python benchmarks/public_models.py --root /tmp/public_models --shim [--only bestformer,sdt_v1] [--fast]

Prints a table (row x step: ok / the one-sentence error) and writes benchmarks/results/public_models.json.
Without --root it prints how to get the files and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from public_model_rows import ROWS, Row
from stand_ins import SHIM_SAYS
from stand_ins import missing as _missing
from stand_ins import write as write_shim

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "public_models.json"
HOWTO = __doc__.split("For every row")[0].strip()


def find_entry(root: Path, row: Row) -> Path | None:
    for fam in (row.family,) + row.aliases:
        p = root / fam / row.entry
        if p.is_file():
            return p
    return None


FP_STATE = ("each FP checkpoint is put in the state of a trained network whose neurons fire: every BatchNorm weight "
            "2, bias 0.5 (as bestcompress.nn.calibrate.make_it_fire), statistics estimated on 8 random batches of 8 "
            "in training mode; a fresh network is silent, so the spike checks would be vacuous, and a silent neuron "
            "before BatchNorms makes their backward multiply by 1/sqrt(eps) each")

# The user's own training script, reduced to what matters here: build with the authors' code, save timm-style.
SAVE_FP = r"""
import importlib.util, json, os, sys, torch
entry, fn, kwargs, out, shape = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4], sys.argv[5]
# as the authors' train.py runs: from the repository root or next to the model file
sys.path[:0] = [os.getcwd(), os.path.dirname(entry)]
import ast
top = os.path.dirname(entry)  # a file that imports relatively is imported from its package (`import models.x`)
if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(open(entry).read()))):
    while os.path.isfile(os.path.join(top, "__init__.py")):
        top = os.path.dirname(top)
if top != os.path.dirname(entry):
    sys.path.insert(0, top)
    mod = importlib.import_module(os.path.relpath(entry, top)[:-3].replace(os.sep, "."))
else:
    spec = importlib.util.spec_from_file_location("public_model", entry)
    mod = importlib.util.module_from_spec(spec); sys.modules["public_model"] = mod; spec.loader.exec_module(mod)
torch.manual_seed(0)
model = getattr(mod, fn)(**kwargs)
# A fresh network is silent (no neuron fires, so every check downstream would be vacuous, and a silent neuron
# before a BatchNorm makes its backward multiply by 1/sqrt(eps)): give it the state of a trained one, whose
# neurons fire, as bestcompress.nn.calibrate.make_it_fire does (every BatchNorm weight 2, bias 0.5), and
# estimate the BatchNorm statistics on random inputs.
for m in model.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        m.momentum = None
        if m.affine:
            with torch.no_grad():
                m.weight.fill_(2.0)
                m.bias.fill_(0.5)
model.train()
with torch.no_grad():
    for _ in range(8):
        model(torch.rand(8, *map(int, shape.split(","))))
        for m in model.modules():
            if m is not model and callable(getattr(m, "reset", None)):
                m.reset()
torch.save({"epoch": 0, "arch": fn, "state_dict": model.state_dict()}, out)
"""

# One eval forward of the binary model. Spiking attention multiplies spikes: every matrix product (Q.K^T, the map
# with V, K^T.V) must take {0, 1} operands only, whether the map comes from an inserted map neuron or from the
# model's own neuron (BESTformer's attn_lif0). Models without a product (SDT's Hadamard attention) have none.
ATTN_CHECK = r"""
import json, sys, torch
from torch.overrides import TorchFunctionMode
import bestcompress as bc
from bestcompress.model_facts import example_input_for
from bestcompress.nn.attention import AttentionMapNeuron
from bestcompress.nn.lif import LIF
path, factory = sys.argv[1], sys.argv[2]
model = bc.load(path, model=factory).model.eval()
PRODUCTS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
products, lifs = [], []

class Products(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            products.append([sorted({float(v) for v in a.detach().unique().tolist()})[:4] for a in args[:2]])
        return func(*args, **(kwargs or {}))

hooks = [m.register_forward_hook(lambda mod, a, out: lifs.append(out.detach().float().mean())) for m in model.modules()
         if isinstance(m, LIF) and not isinstance(m, AttentionMapNeuron)]
x = example_input_for(model, batch=2, seed=0)
with torch.no_grad(), Products():
    model(x)
binary = [all(set(v) <= {0.0, 1.0} for v in p) for p in products]
# a binary map times a constant (Spikformer's scale 0.125 applied after the map neuron): {0, c}, one c
scaled = [all(len(set(v) - {0.0}) <= 1 for v in p) for p in products]
print(json.dumps({"products": len(products), "binary_products": sum(binary), "scaled_binary_products": sum(scaled),
                  "first_other": next((p for p, b in zip(products, scaled) if not b), None),
                  "first_scaled": next((p for p, b in zip(products, binary) if not b), None),
                  "map_neurons": sum(isinstance(m, AttentionMapNeuron) for m in model.modules()),
                  "neuron_rate": float(torch.stack(lifs).mean()) if lifs else None}))
"""


@dataclass
class Runner:
    work: Path
    env: dict
    cwd: Path
    log: list = field(default_factory=list)

    def run(self, args: list[str], timeout: int = 900) -> tuple[bool, str, str]:
        t0 = time.time()
        try:
            p = subprocess.run(args, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired:
            rc, out, err = -1, "", f"timed out after {timeout} s"
        self.log.append({"args": [str(a) for a in args], "rc": rc, "seconds": round(time.time() - t0, 1)})
        return rc == 0, out, err

    def cli(self, *args, **kw):
        return self.run([sys.executable, "-m", "bestcompress", *map(str, args)], **kw)


def sentence(err: str, out: str = "") -> str:
    """The one line a user sees: the CLI's `Error: ...`, else the last line of a traceback."""
    lines = [ln.strip() for ln in (err + "\n" + out).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Error:"):
            return ln[len("Error:"):].strip()[:400]
    return (lines[-1] if lines else "no output")[:400]


def inspect_json(r: Runner, ckpt: Path, factory: str, kwargs: str | None, input_shape: str | None = None):
    args = ["inspect", ckpt, "--model", factory, "--json"] + (["--model-kwargs", kwargs] if kwargs else [])
    ok, out, err = r.cli(*args)
    if not ok and input_shape and "--input-shape" in err:  # as a user would after reading the sentence
        ok, out, err = r.cli(*args, "--input-shape", input_shape)
    if not ok:
        return None, sentence(err, out)
    return json.loads(out), None


def macs_of(summary: dict) -> tuple[int, int, int]:
    """(total MACs, MACs of head, of head2 if any) from an `inspect --json` summary."""
    rows = summary.get("rows") or []
    head = next((int(x.get("macs", 0)) for x in rows if x.get("name", "").split(".")[-1] == "head"), 0)
    head2 = sum(int(x.get("macs", 0)) for x in rows if x.get("name", "").split(".")[-1] in ("head2", "head_kd"))
    return int(summary["macs"]), head, head2


def check_row(row: Row, entry: Path, work: Path, env: dict, recipes: list[str], fast: bool) -> dict:
    # Every command runs from the repository root, as its README has the user do (files written go to `work`).
    r = Runner(work, env, entry.parents[len(Path(row.entry).parts) - 1])
    res: dict = {"file": f"{row.family}/{row.entry}", "builder": row.builder, "kwargs": row.kwargs,
                 "notes": row.notes, "steps": {}}
    steps = res["steps"]
    factory = f"{entry}:{row.builder}"
    kw = json.dumps(row.kwargs)
    fp = work / "fp.pth.tar"
    ok, out, err = r.run([sys.executable, "-c", SAVE_FP, str(entry), row.builder, kw, str(fp), row.input_shape])
    steps["build"] = "ok" if ok else sentence(err, out)
    if not ok:
        res["commands"] = r.log
        return res
    fp_sum, e = inspect_json(r, fp, factory, kw, row.input_shape)
    steps["inspect_fp"] = "ok" if fp_sum else e
    for recipe in recipes:
        tag = "family" if recipe == row.recipe and recipe != "bestformer" else recipe
        if recipe == "bestformer" and row.recipe == "bestformer":
            tag = "family=bestformer"
        out_bin = work / f"bin_{recipe}.pt"
        base = ["binarize", fp, "--model", factory, "--model-kwargs", kw, "--recipe", recipe, "-o", out_bin]
        ok, out, err = r.cli(*base)
        shape_note = "inferred"
        if not ok and "input" in (err + out).lower() and "shape" in (err + out).lower():
            shape_note = f"not inferred ({sentence(err, out)})"
            ok, out, err = r.cli(*base, "--input-shape", row.input_shape)
        steps[f"binarize[{tag}]"] = "ok" if ok else sentence(err, out)
        steps[f"input_shape[{tag}]"] = shape_note if ok else "-"
        if not ok:
            continue
        b_sum, e = inspect_json(r, out_bin, factory, None, row.input_shape)
        if b_sum is None:
            steps[f"macs[{tag}]"] = steps[f"1bit[{tag}]"] = e
        else:
            res.setdefault("summaries", {})[recipe] = {k: v for k, v in b_sum.items() if k not in ("rows", "spec")}
            if fp_sum:
                fp_macs, fp_head, _ = macs_of(fp_sum)
                b_macs, _, b_head2 = macs_of(b_sum)
                limit = fp_macs + (fp_head if b_head2 else 0)
                steps[f"macs[{tag}]"] = ("ok" if b_macs <= limit else
                                         f"binary MACs {b_macs} > FP {fp_macs} + second head")
                res.setdefault("macs", {})[recipe] = {"fp": fp_macs, "fp_head": fp_head, "binary": b_macs}
            rows = b_sum.get("rows") or []
            binary = [x for x in rows if x.get("type", "").startswith("Binary")]
            wide = [x["name"] for x in binary if int(x.get("w_bits", 1)) != 1]
            kept = [x["name"] for x in rows if not x.get("type", "").startswith("Binary") and x.get("params")]
            res.setdefault("full_precision_layers", {})[recipe] = kept
            steps[f"1bit[{tag}]"] = (f"ok ({len(binary)}/{len(binary) + len(kept)} layers; FP: {', '.join(kept[:5])})"
                                     if binary and not wide else "no binary layer" if not binary
                                     else f"not 1-bit: {', '.join(wide[:4])}")
        ok, out, err = r.run([sys.executable, "-c", ATTN_CHECK, str(out_bin), factory])
        if ok:
            a = json.loads(out.strip().splitlines()[-1])
            res.setdefault("attention", {})[recipe] = a
            rate = f"neurons fire {100 * (a['neuron_rate'] or 0):.1f} %"
            if not a["products"]:
                steps[f"attn01[{tag}]"] = f"ok (no matrix product: elementwise attention; {rate})"
            elif a["scaled_binary_products"] == a["products"]:
                scaled = a["products"] - a["binary_products"]
                steps[f"attn01[{tag}]"] = (f"ok ({a['products']} products, operands {{0,1}}"
                                           + (f"; {scaled} with one operand {{0,c}}: a {{0,1}} map times the "
                                              f"model's constant scale {a['first_scaled']}" if scaled else "")
                                           + f"; {a['map_neurons']} map neurons inserted; {rate})")
            else:
                steps[f"attn01[{tag}]"] = (f"{a['products'] - a['scaled_binary_products']}/{a['products']} products "
                                           f"take non-binary operands (values {a['first_other']})")
        else:
            steps[f"attn01[{tag}]"] = sentence(err, out)
        if fast and recipe != recipes[0]:
            continue
        cie = work / f"cie_{recipe}.pt"
        ok, out, err = r.cli("distill", out_bin, "--model", factory, "--data", "synthetic", "--subset", "16",
                             "--epochs", "1", "--limit-batches", "1", "--set", "train.batch_size=8",
                             "--set", "train.calibrate_batches=1", "--device", "cpu", "--no-progress",
                             "--run-dir", work / f"run_{recipe}", "-o", cie)
        steps[f"distill[{tag}]"] = "ok" if ok else sentence(err, out)
        src = cie if ok else out_bin
        for fmt, suffix in (("qonnx", ".qonnx.onnx"), ("onnx", ".onnx")):
            ok, out, err = r.cli("export", src, "-f", fmt, "-o", work / f"m_{recipe}{suffix}", "--model", factory)
            steps[f"{fmt}[{tag}]"] = ("ok" if ok else sentence(err, out)) + ("" if src == cie else " (binary, not distilled)")
    res["commands"] = r.log
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="folder of the public files (see the module docstring)")
    ap.add_argument("--shim", action="store_true", help="stand in for missing timm/clock_driven/einops/torchinfo")
    ap.add_argument("--only", help="comma-separated row names")
    ap.add_argument("--fast", action="store_true", help="distill and export only with the first recipe")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--keep", type=Path, help="keep the scratch folders here")
    ap.add_argument("--update", action="store_true", help="replace only the rows run in an existing --output")
    a = ap.parse_args(argv)
    if a.root is None:
        print(HOWTO)
        print("\nThen: python benchmarks/public_models.py --root DIR --shim")
        return 0
    rows = [r for r in ROWS if not a.only or r.name in a.only.split(",")]
    missing = _missing()
    if missing and not a.shim:
        print(f"The public code needs {', '.join(missing)}, not installed here; pass --shim to stand in for them.")
        return 2
    base = Path(tempfile.mkdtemp(prefix="public_models_", dir=a.keep))
    shim = base / "shim"
    write_shim(shim, missing)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(shim), str(ROOT)) if p),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), BESTCOMPRESS_LIF="torch")
    results = {"shim": {m: SHIM_SAYS[m] for m in missing}, "fp_state": FP_STATE, "rows": {}}
    for row in rows:
        entry = find_entry(a.root, row)
        if entry is None:
            results["rows"][row.name] = {"skipped": f"no {row.family}/{row.entry} under {a.root}"}
            print(f"{row.name}: skipped (no {row.family}/{row.entry})", flush=True)
            continue
        work = base / row.name
        work.mkdir()
        t0 = time.time()
        recipes = [row.recipe] + (["bestformer"] if row.recipe != "bestformer" else [])
        res = check_row(row, entry.resolve(), work, env, recipes, a.fast)
        res["seconds"] = round(time.time() - t0, 1)
        results["rows"][row.name] = res
        print(f"{row.name} ({res['seconds']} s): " + "; ".join(f"{k} {v}" for k, v in res["steps"].items()),
              flush=True)
    if a.update and a.output.is_file():
        old = json.loads(a.output.read_text())
        old["rows"].update(results["rows"])
        old["shim"].update(results["shim"])
        old["fp_state"] = FP_STATE
        results = old
    print_table(results)
    a.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = a.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, a.output)
    print(f"wrote {a.output}")
    return 0


def print_table(results: dict) -> None:
    steps = []
    for res in results["rows"].values():
        for k in res.get("steps", {}):
            if k not in steps:
                steps.append(k)
    print()
    for name, res in results["rows"].items():
        print(f"== {name}")
        if "skipped" in res:
            print(f"   skipped: {res['skipped']}")
            continue
        for k in steps:
            if k in res["steps"]:
                print(f"   {k:<28} {res['steps'][k]}")


if __name__ == "__main__":
    sys.exit(main())

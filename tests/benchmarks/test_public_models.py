"""benchmarks/public_models.py: without --root it says how to get the public files; its stand-ins make the legacy
spikingjelly imports of the public code resolve to spikingjelly 2.0 neurons in the CLI's child processes only."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import public_models  # noqa: E402


def _run_in_child(shim: Path, code: str) -> list[str]:
    """Run `code` in a child Python whose only path entry is the stand-ins' folder; its stdout words."""
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(shim), "PATH": ""},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_without_root_it_prints_where_the_files_come_from_and_exits_0(capsys):
    assert public_models.main([]) == 0
    out = capsys.readouterr().out
    for row in public_models.ROWS:
        assert row.repo in out
    assert "--root" in out


def test_the_entry_is_found_under_the_family_or_the_repository_name(tmp_path):
    row = next(r for r in public_models.ROWS if r.name == "bestformer")
    assert public_models.find_entry(tmp_path, row) is None
    (tmp_path / "BESTFormer" / "cifar").mkdir(parents=True)
    (tmp_path / "BESTFormer" / "cifar" / "model.py").write_text("")
    assert public_models.find_entry(tmp_path, row) == tmp_path / "BESTFormer" / "cifar" / "model.py"


def test_the_clock_driven_stand_in_gives_multi_step_spikingjelly_2_neurons(tmp_path):
    pytest.importorskip("spikingjelly.activation_based")
    public_models.write_shim(tmp_path, ["spikingjelly.clock_driven", "timm"])
    code = ("from spikingjelly.clock_driven.neuron import MultiStepLIFNode, MultiStepParametricLIFNode\n"
            "from spikingjelly.activation_based.neuron import LIFNode\n"
            "from timm.models.layers import to_2tuple\n"
            "n = MultiStepLIFNode(tau=2.0, v_threshold=0.5, detach_reset=True, backend='cupy')\n"
            "p = MultiStepParametricLIFNode(init_tau=2.0, detach_reset=True, backend='cupy')\n"
            "print(isinstance(n, LIFNode), n.step_mode, n.v_threshold, p.step_mode, to_2tuple(4))\n")
    assert _run_in_child(tmp_path, code) == ["True", "m", "0.5", "m", "(4,", "4)"]


def test_the_backend_stand_in_lets_activation_based_neurons_take_backend_alongside_clock_driven(tmp_path):
    # SpikingResformer's layers subclass activation_based neurons with backend='cupy' (spikingjelly 0.0.0.0.14);
    # both import hooks are written into the one sitecustomize and both work.
    pytest.importorskip("spikingjelly.activation_based")
    public_models.write_shim(tmp_path, ["spikingjelly.clock_driven", "spikingjelly backend="])
    code = ("import torch\nfrom spikingjelly.activation_based import neuron\n"
            "from spikingjelly.clock_driven.neuron import MultiStepLIFNode\n"
            "class LIF(neuron.LIFNode):\n"
            "    def __init__(self):\n"
            "        super().__init__(tau=2., v_threshold=1., detach_reset=True, step_mode='m', backend='cupy')\n"
            "ref = neuron.LIFNode(tau=2., v_threshold=1., detach_reset=True, step_mode='m')\n"
            "x = torch.rand(3, 2, 5) * 3\n"
            "print(torch.equal(LIF()(x), ref(x)), MultiStepLIFNode(tau=2.0).step_mode)\n")
    assert _run_in_child(tmp_path, code) == ["True", "m"]
    plain = code.replace("from spikingjelly.clock_driven.neuron import MultiStepLIFNode\n", "")
    bare = subprocess.run([sys.executable, "-c", plain], env={"PATH": ""}, capture_output=True, text=True,
                          timeout=120)
    assert bare.returncode != 0 and "backend" in bare.stderr  # what the stand-in is for

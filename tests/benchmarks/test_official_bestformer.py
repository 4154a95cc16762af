"""bench_speed --official: the public code is imported from the user's folder; what it needs and is missing gives
one sentence (row skipped), or stand-ins with --official-shim that leave nothing behind in sys.modules."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import official_bestformer  # noqa: E402

# A model file importing what the public cifar/model.py imports (its layout: cifar/model.py + quantized_utils.py)
FAKE = '''
import torch
import torch.nn as nn
from spikingjelly.clock_driven.neuron import MultiStepLIFNode
from timm.models.layers import to_2tuple, trunc_normal_, DropPath
from timm.models.registry import register_model
from timm.models.vision_transformer import _cfg
from quantized_utils import scale

class vit_snn(nn.Module):
    def __init__(self, embed_dims=8, num_classes=10, T=4, patch_size=4, drop_path_rate=0.0, **kw):
        super().__init__()
        self.T, self.patch = T, to_2tuple(patch_size)
        self.lif = MultiStepLIFNode(tau=2.0, detach_reset=True, backend='cupy')
        self.head = nn.Linear(3, num_classes)
        self.drop = DropPath(drop_path_rate)
        trunc_normal_(self.head.weight, std=.02)

    def forward(self, x):
        x = x.unsqueeze(0).repeat(self.T, 1, 1, 1, 1) * scale
        return self.head(self.drop(self.lif(x)).mean((0, 3, 4))), self.head(x.mean((0, 3, 4)))

@register_model
def BESTFormer(pretrained=False, **kwargs):
    model = vit_snn(**kwargs)
    model.default_cfg = _cfg()
    return model
'''


@pytest.fixture
def public(tmp_path):
    (tmp_path / "cifar").mkdir()
    (tmp_path / "cifar" / "model.py").write_text(FAKE)
    (tmp_path / "cifar" / "quantized_utils.py").write_text("scale = 2.0\n")
    return tmp_path


def test_missing_packages_skip_the_row_with_a_sentence(public, tmp_path):
    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed here")
    build, why = official_bestformer.load(public, shim=False)
    assert build is None and "timm" in why and "--official-shim" in why
    build, why = official_bestformer.load(tmp_path / "nowhere", shim=True)
    assert build is None and "model.py" in why


def test_stand_ins_build_and_train_the_public_model_and_leave_nothing_behind(public):
    pytest.importorskip("spikingjelly.activation_based")
    before = set(sys.modules)
    build, info = official_bestformer.load(public, shim=True)
    assert build is not None, info
    assert info["file"] == "cifar/model.py" and set(info["stand_ins"]) <= {"timm", "spikingjelly.clock_driven"}
    assert not {"timm", "spikingjelly.clock_driven", "quantized_utils"} & (set(sys.modules) - before)
    model = build()
    x = torch.rand(2, 3, 4, 4) * 3
    out0, _ = model(x)
    out0.sum().backward()
    lif = model.lif
    assert lif.step_mode == "m" and lif.detach_reset and lif.tau == 2.0
    assert torch.is_tensor(lif.v)  # the membrane after the steps
    official_bestformer.reset(model)  # forgotten between training steps, as the public loop's reset_net does
    assert lif.v == 0.0 and not torch.is_tensor(lif.v)

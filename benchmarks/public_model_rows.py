"""The rows of benchmarks/public_models.py: each public spiking-transformer file, the builder (function or class)
called with a small config, the family recipe and the input shape a user would pass if it is not inferred. A row's
notes say why a config differs from the authors' (a builder that fixes sizes, a hard-coded image size)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    name: str
    family: str          # folder under --root
    repo: str
    entry: str           # repository path of the file that holds the builder
    builder: str
    kwargs: dict
    recipe: str          # the family recipe
    input_shape: str     # what a user would pass when the shape is not inferred
    aliases: tuple = ()  # other folder names (the repository's own name)
    notes: str = ""


CIFAR = dict(img_size_h=32, img_size_w=32, in_channels=3, num_classes=10)
SDT_V2_NOTES = (
    "the class (its builders fix 224 px; it stores no image size, so --input-shape is asked for); T = 1 in the "
    "class; mlp_ratios=4 (MS_ConvBlock hard-codes 4); num_heads=1: 64-80 channels per head, as the public configs "
    "have 48-96 (8 heads of 8-10 channels and 2x2 tokens keep q.k^T.v below attn_lif's threshold: silent "
    "attention feeds proj_conv's three BatchNorms a constant, each backward multiplies by 1/sqrt(eps) = 316, and "
    "one training step of the authors' own FP model reached gradients of 1e30 (binary: Inf), with a fresh "
    "network's BatchNorms at any batch size 2-32, 32-64 px, uniform or normal data)")
ROWS = [
    Row("spikformer_cifar", "spikformer", "ZK-Zhou/spikformer", "cifar10/model.py", "spikformer",
        dict(CIFAR, patch_size=4, embed_dims=64, num_heads=2, mlp_ratios=4, depths=2, sr_ratios=1, T=2),
        "spikformer_cifar", "3,32,32"),
    Row("spikformer_imagenet", "spikformer", "ZK-Zhou/spikformer", "imagenet/model.py", "Spikformer",
        dict(CIFAR, patch_size=16, embed_dims=64, num_heads=2, mlp_ratios=4, depths=2, sr_ratios=1),
        "spikformer_imagenet", "3,32,32", notes="the class (its builder fixes 224 px, 8-512); T = 4 in forward"),
    Row("spikformer_dvs", "spikformer", "ZK-Zhou/spikformer", "cifar10dvs/model.py", "Spikformer",
        dict(img_size_h=128, img_size_w=128, patch_size=16, in_channels=2, num_classes=10, embed_dims=64,
             num_heads=2, mlp_ratios=4, depths=2, sr_ratios=1),
        "spikformer_cifar", "2,2,128,128",
        notes="the class (its builder fixes 16-256); input [B, T, 2, H, W]; its SPS hard-codes 128 px"),
    Row("sdt_v1", "sdt_v1", "BICLab/Spike-Driven-Transformer", "model/spikeformer.py", "sdt",
        dict(CIFAR, patch_size=4, embed_dims=64, num_heads=2, mlp_ratios=4, depths=2, T=2, pooling_stat="0011",
             spike_mode="lif"),
        "sdt_v1", "3,32,32", aliases=("Spike-Driven-Transformer",)),
    Row("qkformer", "qkformer", "zhouchenlin2096/QKFormer", "cifar10/model.py", "QKFormer",
        dict(CIFAR, patch_size=4, embed_dims=64, mlp_ratios=2, depths=3, sr_ratios=1, T=2),
        "qkformer", "3,32,32", aliases=("QKFormer",), notes="depths=3: one block in stage 3 (depths - 2)"),
    Row("sdt_v2", "sdt_v2", "BICLab/Spike-Driven-Transformer-V2", "classification/models.py",
        "Spiking_vit_MetaFormer",
        dict(CIFAR, patch_size=16, embed_dim=[16, 32, 64, 80], num_heads=1, mlp_ratios=4, depths=8, sr_ratios=1),
        "sdt_v2", "3,32,32", aliases=("Spike-Driven-Transformer-V2",), notes=SDT_V2_NOTES),
    Row("sdt_v2_kd", "sdt_v2", "BICLab/Spike-Driven-Transformer-V2", "classification/models.py",
        "Spiking_vit_MetaFormer",
        dict(CIFAR, patch_size=16, embed_dim=[16, 32, 64, 80], num_heads=1, mlp_ratios=4, depths=8, sr_ratios=1,
             kd=True),
        "sdt_v2", "3,32,32", aliases=("Spike-Driven-Transformer-V2",),
        notes="kd=True: (head, head_kd) in training, their mean in eval; " + SDT_V2_NOTES),
    Row("bestformer", "bestformer", "CaoHLin/BESTFormer", "cifar/model.py", "BESTFormer",
        dict(CIFAR, patch_size=4, embed_dims=64, num_heads=2, mlp_ratios=4, qkv_bias=False, depths=2,
             sr_ratios=1, T=4, drop_rate=0.0, drop_path_rate=0.0),
        "bestformer", "3,32,32", aliases=("BESTFormer",),
        notes="two heads (head, head2); T=4 (its attention's lambda is built for T=4 whatever T is passed)"),
    Row("spikingformer_cifar", "spikingformer", "zhouchenlin2096/Spikingformer", "cifar10/model.py", "Spikingformer",
        dict(CIFAR, patch_size=4, embed_dims=64, num_heads=2, mlp_ratios=4, depths=2, sr_ratios=1, T=2),
        "spikingformer", "3,32,32", aliases=("Spikingformer",)),
    Row("spikingformer_imagenet", "spikingformer", "zhouchenlin2096/Spikingformer", "imagenet/model.py",
        "Spikingformer", dict(CIFAR, patch_size=16, embed_dims=64, num_heads=2, mlp_ratios=4, depths=2, sr_ratios=1,
                              T=2),
        "spikingformer", "3,32,32", aliases=("Spikingformer",),
        notes="the ImageNet tokenizer (four max-pool stages) at 32 px: 2x2 tokens"),
    Row("spikingformer_dvs", "spikingformer", "zhouchenlin2096/Spikingformer", "cifar10-dvs/model.py",
        "vit_snn", dict(img_size_h=128, img_size_w=128, patch_size=16, in_channels=2, num_classes=10,
                              embed_dims=64, num_heads=2, mlp_ratios=4, depths=2, sr_ratios=1, T=2),
        "spikingformer", "2,2,128,128", aliases=("Spikingformer",),
        notes="the class (its builder fixes 16-256); input [B, T, 2, H, W] (T=2 declared, as the frames passed); "
              "its tokenizer hard-codes 128 px"),
    Row("qkformer_imagenet", "qkformer", "zhouchenlin2096/QKFormer", "imagenet/qkformer.py",
        "hierarchical_spiking_transformer",
        dict(CIFAR, T=2, patch_size=16, embed_dims=64, num_heads=2, mlp_ratios=4, depths=4, sr_ratios=1),
        "qkformer", "3,32,32", aliases=("QKFormer",),
        notes="the class (its builders fix 224 px, 10-384 and up); depths=4: one block in stage 3 (depths - 3)"),
    Row("qkformer_dvs", "qkformer", "zhouchenlin2096/QKFormer", "cifar10-dvs/model.py", "vit_snn",
        dict(img_size_h=64, img_size_w=64, patch_size=16, in_channels=2, num_classes=10, embed_dims=64,
             mlp_ratios=1, depths=4, sr_ratios=1, T=2),
        "qkformer", "2,2,64,64", aliases=("QKFormer",),
        notes="the class (its builder fixes embed_dims=256); it sets num_heads = 16 itself; input [B, T, 2, H, W] "
              "(T=2 declared, as the frames passed)"),
    Row("spikingformer_cml_cifar", "spikingformer_cml", "zhouchenlin2096/Spikingformer-CML", "cifar10/model.py",
        "Spikingformer",
        dict(CIFAR, patch_size=4, embed_dims=64, num_heads=2, mlp_ratios=4, depths=2, sr_ratios=1, T=2),
        "spikingformer", "3,32,32", aliases=("Spikingformer-CML",)),
    Row("cml_spikformer_cifar", "spikingformer_cml", "zhouchenlin2096/Spikingformer-CML", "cifar10/CML_Spikformer.py",
        "CML_Spikformer",
        dict(CIFAR, patch_size=4, embed_dims=64, num_heads=2, mlp_ratios=4, depths=2, sr_ratios=1, T=2),
        "spikformer_cifar", "3,32,32", aliases=("Spikingformer-CML",)),
    Row("spikingresformer", "spikingresformer", "xyshi2000/SpikingResformer", "models/spikingresformer.py",
        "SpikingResformer",
        dict(layers=[["DSSA", "GWFFN"]] * 3, planes=[32, 64, 128], num_heads=[1, 2, 4], patch_sizes=[4, 2, 1],
             img_size=32, T=2, in_channels=3, num_classes=10, group_size=32),
        "spikingformer", "3,32,32", aliases=("SpikingResformer",),
        notes="the class (its builders fix 64-384 and up, its CIFAR builder 32 px); no recipe of its own: "
              "spikingformer's (attention map: auto); models/ is a package (relative imports); spikingjelly "
              "activation_based neurons with backend='cupy'; output [T, B, classes] (its main.py averages over T)"),
]

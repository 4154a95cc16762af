"""CIE losses: each part is zero / minimal where it should be, the total follows the documented formula, and
gradients reach the latent weights of binary layers."""
import pytest
import torch
import torch.nn.functional as F

from bestcompress.convert import binarize
from bestcompress.model_facts import example_input_for
from bestcompress.training import CIELoss, ce_loss, class_loss, feature_alignment_loss, feature_taps
from bestcompress.errors import ModelError, RecipeError
from bestcompress.nn.binary import is_binary_layer
from bestcompress.recipe import DistillConfig
from bestcompress.zoo import tiny_model


def _logits(seed=0, b=6, c=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g)


def test_soft_kl_is_zero_when_student_equals_teacher():
    t, y = _logits()
    loss = CIELoss(DistillConfig(losses=("soft",), temperature=2.0))
    _, parts = loss((t.clone(), t.clone()), y, teacher_logits=t)
    assert abs(parts["soft"]) < 1e-6
    _, parts = loss((t, t + torch.randn_like(t)), y, teacher_logits=t)
    assert parts["soft"] > 1e-3


def test_hard_distillation_is_minimal_when_head2_is_scaled_teacher():
    t, y = _logits(1)
    loss = CIELoss(DistillConfig(losses=("hard",), alpha=0.5, label_smoothing=0.1, heads="split"))
    values = [loss((t, s * t), y, teacher_logits=t)[1]["hard"] for s in (1.0, 5.0, 100.0)]
    assert values[0] > values[1] > values[2] and values[2] < 1e-3
    head, head2 = _logits(2)[0], _logits(3)[0]
    total, parts = loss((head, head2), y, teacher_logits=t)
    expected = 0.5 * F.cross_entropy(head, y, label_smoothing=0.1) + 0.5 * F.cross_entropy(head2, t.argmax(-1))
    torch.testing.assert_close(total, expected)
    assert parts["total"] == pytest.approx(float(expected))
    assert set(parts) == {"ce", "hard", "total"}


def test_heads_both_gives_each_head_the_labels_and_the_teacher():
    t, y = _logits(6)
    head, head2 = _logits(7)[0], _logits(8)[0]
    cfg = DistillConfig(losses=("soft",), alpha=0.4, temperature=2.0, label_smoothing=0.1, heads="both")
    total, parts = CIELoss(cfg)((head, head2), y, teacher_logits=t)

    def one(h):
        soft = F.kl_div(F.log_softmax(h / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean",
                        log_target=True) * 4
        return 0.6 * F.cross_entropy(h, y, label_smoothing=0.1) + 0.4 * soft
    torch.testing.assert_close(total, (one(head) + one(head2)) / 2)
    split, _ = CIELoss(DistillConfig(losses=("soft",), alpha=0.4, temperature=2.0, label_smoothing=0.1,
                                     heads="split"))(
        (head, head2), y, teacher_logits=t)
    assert abs(float(split) - float(total)) > 1e-4  # the DeiT split differs


def test_single_head_plays_both_roles_and_losses_combine():
    t, y = _logits(4)
    s = _logits(5)[0]
    cfg = DistillConfig(losses=("hard", "soft"), alpha=0.3, temperature=3.0, label_smoothing=0.0)
    total, parts = CIELoss(cfg)(s, y, teacher_logits=t)
    hard = F.cross_entropy(s, t.argmax(-1))
    soft = F.kl_div(F.log_softmax(s / 3, -1), F.log_softmax(t / 3, -1), reduction="batchmean", log_target=True) * 9
    torch.testing.assert_close(total, 0.7 * F.cross_entropy(s, y) + 0.3 * (hard + soft) / 2)


def test_feature_alignment_is_zero_for_equal_features():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 3, 4, 8, generator=g) for _ in range(2)]
    assert feature_alignment_loss(feats, [f.clone() for f in feats]).item() < 1e-6
    # invariant to a positive affine map per time step and sample (it compares standardized features)
    assert feature_alignment_loss(feats, [3 * f + 1 for f in feats]).item() < 1e-6
    other = [torch.randn(2, 3, 4, 8, generator=g) for _ in range(2)]
    value = feature_alignment_loss(feats, other).item()
    assert 1.0 < value < 3.0  # 2·(1 − ρ) with ρ ≈ 0
    with pytest.raises(ModelError, match="2 student block outputs but 1 teacher"):
        feature_alignment_loss(feats, other[:1])
    with pytest.raises(ModelError, match="shape"):
        feature_alignment_loss(feats[:1], [torch.randn(2, 3, 8)])


def test_ce_loss_tuple_soft_targets_and_class_loss():
    a, y = _logits(6)
    b = _logits(7)[0]
    torch.testing.assert_close(ce_loss((a, b), y, 0.1),
                               (F.cross_entropy(a, y, label_smoothing=0.1) + F.cross_entropy(b, y, label_smoothing=0.1)) / 2)
    soft = F.one_hot(y, 5).float() * 0.6 + 0.08  # e.g. mixup targets, rows sum to 1
    torch.testing.assert_close(ce_loss(a, soft), -(soft * F.log_softmax(a, -1)).sum(-1).mean())
    cl = class_loss(DistillConfig(label_smoothing=0.1))
    assert not cl.needs_teacher and not cl.needs_features
    total, parts = cl((a, b), y)
    torch.testing.assert_close(total, ce_loss((a, b), y, 0.1))
    assert set(parts) == {"ce", "total"}


def test_bad_configuration_and_missing_inputs():
    with pytest.raises(RecipeError, match="distill.losses"):
        CIELoss(DistillConfig(losses=("hard", "kl")))
    with pytest.raises(RecipeError, match="alpha"):
        CIELoss(DistillConfig(alpha=1.5))
    loss = CIELoss(DistillConfig(losses=("hard", "feature")))
    assert loss.needs_teacher and loss.needs_features
    t, y = _logits()
    with pytest.raises(ModelError, match="teacher"):
        loss(t, y)
    with pytest.raises(ModelError, match="feature_taps"):
        loss(t, y, teacher_logits=t)
    plain = CIELoss(DistillConfig(losses=()))
    assert not plain.needs_teacher and not plain.needs_features
    total, parts = plain((t, t), y)
    assert set(parts) == {"ce", "total"}


def test_gradients_reach_binary_latent_weights():
    torch.manual_seed(0)
    teacher = tiny_model("spikformer_seq", depths=2).eval()
    student = binarize(teacher, "bestformer").model.train()
    x = example_input_for(teacher, batch=4)
    y = torch.tensor([0, 1, 2, 3])
    loss = CIELoss(DistillConfig(losses=("hard", "soft", "feature"), temperature=2.0))
    with feature_taps(student, teacher) as taps:
        with torch.no_grad():
            t = teacher(x)
        out = student(x)
        total, parts = loss(out, y, t, taps.student, taps.teacher)
    assert set(parts) == {"ce", "hard", "soft", "feature", "total"} and parts["feature"] > 0
    total.backward()
    binary = [(n, m) for n, m in student.named_modules() if is_binary_layer(m)]
    assert binary
    missing = [n for n, m in binary if m.weight.grad is None]
    assert not missing, f"no gradient reached {missing}"
    nonzero = [n for n, m in binary if m.weight.grad.abs().sum() > 0]
    assert len(nonzero) >= len(binary) // 2
    assert student.head2.weight.grad is not None and student.head2.weight.grad.abs().sum() > 0


def test_attention_relation_loss_zero_for_equal_directions_and_positive_otherwise():
    from bestcompress.training.losses import attention_relation_loss, relation
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.rand(2, 3, 2, 6, 4, generator=g), torch.rand(2, 3, 2, 4, 6, generator=g)) for _ in range(2)]
    assert attention_relation_loss(pairs, [(a.clone(), b.clone()) for a, b in pairs]).item() < 1e-10
    # relations compare row directions: a positive scale per row changes nothing
    scaled = [(a * torch.rand(a.shape[:-1] + (1,), generator=g) + 0 * a, b * 3) for a, b in pairs]
    assert attention_relation_loss(pairs, scaled).item() < 1e-10
    other = [(torch.rand(2, 3, 2, 6, 4, generator=g), torch.rand(2, 3, 2, 4, 6, generator=g)) for _ in range(2)]
    assert attention_relation_loss(pairs, other).item() > 1e-3
    r = relation(pairs[0][0])
    assert r.shape == (2, 3, 2, 6, 6) and torch.allclose(r.diagonal(dim1=-2, dim2=-1), torch.ones(2, 3, 2, 6))
    with pytest.raises(ModelError, match="2 student attention matmuls but 1 teacher"):
        attention_relation_loss(pairs, other[:1])
    with pytest.raises(ModelError, match="no matmul of two activations"):
        attention_relation_loss([], [])


def test_distillation_gradients_reach_the_student_only():
    """Each distillation term: 0 for a student equal to its teacher, > 0 otherwise, no gradient to the teacher."""
    torch.manual_seed(0)
    teacher = tiny_model("spikformer_seq", depths=2).eval()
    from bestcompress.nn.calibrate import make_it_fire
    make_it_fire(teacher, example_input_for(teacher, batch=1).shape[1:])
    x = example_input_for(teacher, batch=4)
    y = torch.tensor([0, 1, 2, 3])
    twin = binarize(teacher, "identity").model.eval()  # the same function as the teacher
    student = binarize(teacher, "bestformer").model.train()
    for name in ("soft", "feature", "attention"):
        loss = CIELoss(DistillConfig(losses=(name,), temperature=2.0))
        assert loss.needs_teacher == (name == "soft")
        with feature_taps(twin, teacher, **loss.tap_options) as taps:
            with torch.no_grad():
                t = teacher(x)
                _, same = loss(twin(x), y, t, taps.student, taps.teacher)
        assert abs(same[name]) < 1e-6, name
        with feature_taps(student, teacher, **loss.tap_options) as taps:
            t = teacher(x)  # with gradients on: the loss must still not reach the teacher
            total, parts = loss(student(x), y, t, taps.student, taps.teacher)
        assert parts[name] > 1e-4, name
        teacher.zero_grad(set_to_none=True)
        student.zero_grad(set_to_none=True)
        total.backward()
        assert all(p.grad is None for p in teacher.parameters()), name
        assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0, name
    assert set(parts) == {"ce", "attention", "total"}

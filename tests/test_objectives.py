"""Training modes as objects: the registry picks one by ``loss.mode``; a new mode needs nothing in fastmeal/."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from tiny import NUM_CLASSES, SmallNet, make_teachers, make_trainer, tiny_config
from torch import nn

from fastmeal import objectives, registry
from fastmeal.batch import Batch, cutmix_
from fastmeal.config import ConfigError
from fastmeal.data.plan import plan_cutmix
from fastmeal.errors import SetupError
from fastmeal.metrics import read_jsonl
from fastmeal.models.discriminator import Discriminator
from fastmeal.objectives import (
    HardLabels,
    MealV2,
    MealV2FromBank,
    Objective,
    TrainedModel,
    build_objective,
    check_loss_impl,
    needs_teachers,
)


class SmoothedLabels(Objective):
    """A fourth mode, defined here only: cross-entropy to labels smoothed by 0.1, with its own logged part."""

    part_names = ("loss", "confidence")

    def forward(self, logits, labels, targets):
        logits = logits.float()
        confidence = logits.softmax(-1).max(-1).values.mean().detach()
        return {"loss": F.cross_entropy(logits, labels, label_smoothing=0.1), "confidence": confidence}


def test_a_new_mode_is_one_class_and_one_registry_line(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="loss.mode='smoothed'"):
        tiny_config(tmp_path / "before", **{"loss.mode": "smoothed"})
    monkeypatch.setitem(registry.OBJECTIVES, "smoothed", SmoothedLabels)  # the registry line
    cfg = tiny_config(tmp_path / "run", **{"loss.mode": "smoothed", "schedule.epochs": 1})
    trainer = make_trainer(cfg, seed=4)
    assert type(trainer.objective) is SmoothedLabels
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["student"]  # no discriminator: one group
    start = {k: v.clone() for k, v in trainer.model.student.state_dict().items()}
    summary = trainer.fit()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl", "train")
    assert summary["global_step"] == 3 and len(rows) == 3 and all("confidence" in r for r in rows)

    # The first step's logged loss is label-smoothed CE of the start weights, computed here independently.
    student = SmallNet()
    student.load_state_dict(start)
    loader = trainer.train_loader
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    with torch.no_grad():
        logits = student(images).double()
    log_q = logits.log_softmax(-1)
    smooth = torch.full_like(log_q, 0.1 / NUM_CLASSES)
    smooth[torch.arange(len(labels)), labels] += 0.9
    expected = float(-(smooth * log_q).sum(-1).mean())
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_the_registry_builds_each_mode_with_what_it_needs(tmp_path):
    ce = build_objective(tiny_config(tmp_path, **{"loss.mode": "ce"}), teachers=make_teachers())
    assert type(ce) is HardLabels and ce.discriminator is None and ce.part_names == ("loss",)
    online = build_objective(tiny_config(tmp_path), teachers=make_teachers(), discriminator=Discriminator(NUM_CLASSES))
    assert type(online) is MealV2 and online.part_names == ("loss", "kd", "d", "kl")
    assert [g["name"] for g in online.param_groups()] == ["discriminator"]
    without_d = build_objective(tiny_config(tmp_path, **{"loss.discriminator": "false"}), teachers=make_teachers())
    assert without_d.discriminator is None and without_d.part_names == ("loss", "kd", "kl")


def test_cutmix_mixes_the_hard_labels_by_the_planned_lambda_and_permutation():
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 16, 16), torch.arange(8) % NUM_CLASSES
    batch = cutmix_(Batch(images.clone(), labels), seed=3, epoch=2, step=5)
    lam, _, perm = plan_cutmix(3, 2, 5, 8, height=16, width=16)
    assert float(batch.targets["mix_lam"]) == pytest.approx(lam) and batch.targets["mix_perm"].tolist() == list(perm)
    logits = torch.randn(8, NUM_CLASSES)
    loss = HardLabels()(logits, labels, batch.targets)["loss"]
    expected = lam * F.cross_entropy(logits, labels) + (1 - lam) * F.cross_entropy(logits, labels[perm])
    assert 0.0 < lam < 1.0 and not torch.equal(labels[perm], labels)  # a draw where the two terms differ
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_the_online_objective_prepares_teacher_logits_outside_the_step():
    teachers = make_teachers()
    objective = MealV2(teachers=teachers, discriminator=None, impl="torch")
    batch = Batch(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.int64))
    objective.prepare(batch)
    torch.testing.assert_close(batch.targets["teacher_logits"], teachers(batch.images))
    assert not batch.targets["teacher_logits"].requires_grad


# --- Each mode's loss against float64 formulas written out here, and what each mode is built with. ---


def _log_softmax64(logits):
    x = logits.detach().double()
    return x - torch.logsumexp(x, -1, keepdim=True)


def _ce64(logits, labels):
    return -_log_softmax64(logits)[torch.arange(len(labels)), labels].mean()


def _bce_with_logits64(scores, targets):
    z = scores.detach().double()
    return (F.softplus(z) - z * targets).mean()  # -(y log σ(z) + (1-y) log(1-σ(z)))


def _discriminator_targets64(batch_size):
    """[1, 0] for each of the B student rows, then [0, 1] for each of the B teacher rows."""
    return torch.tensor([[1.0, 0.0]] * batch_size + [[0.0, 1.0]] * batch_size, dtype=torch.float64)


def test_hard_label_loss_is_fp32_cross_entropy_of_half_logits_and_cutmix_weights_both_labels():
    torch.manual_seed(1)
    logits = (3 * torch.randn(6, NUM_CLASSES)).to(torch.bfloat16)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    plain = HardLabels()(logits, labels, {})
    assert set(plain) == {"loss"} and plain["loss"].dtype == torch.float32
    assert float(plain["loss"]) == pytest.approx(float(_ce64(logits, labels)), rel=1e-6)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    mixed = HardLabels()(logits, labels, {"mix_lam": torch.tensor(0.3), "mix_perm": perm})["loss"]
    expected = 0.3 * _ce64(logits, labels) + 0.7 * _ce64(logits, labels[perm])
    assert not torch.equal(labels[perm], labels)
    assert mixed.dtype == torch.float32 and float(mixed) == pytest.approx(float(expected), rel=1e-6)


def test_online_loss_parts_are_the_float64_meal_v2_formulas(tmp_path):
    """prepare() runs the teachers; forward() is kd (soft CE to the teachers' mean softmax), d (the BCE of D on the
    student rows then the teachers' mean logits) and kl, with and without the discriminator."""
    teachers = make_teachers()
    torch.manual_seed(2)
    images, labels = torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.int64)
    logits = 2 * torch.randn(4, NUM_CLASSES)
    t = teachers(images).double()
    p = torch.softmax(t, -1).mean(0)
    log_q = _log_softmax64(logits)
    kd = -(p * log_q).sum(-1).mean()
    kl = (p * (p.log() - log_q)).sum(-1).mean()
    for with_d in (True, False):
        disc = Discriminator(NUM_CLASSES) if with_d else None
        cfg = tiny_config(tmp_path, **{"loss.discriminator": str(with_d).lower()})
        objective = build_objective(cfg, teachers=teachers, discriminator=disc)
        batch = Batch(images, labels)
        objective.prepare(batch)
        parts = {k: v.detach() for k, v in objective(logits, labels, batch.targets).items()}
        assert set(parts) == set(objective.part_names)
        assert float(parts["kd"]) == pytest.approx(float(kd), rel=1e-5)
        assert float(parts["kl"]) == pytest.approx(float(kl), rel=1e-4, abs=1e-7)
        if with_d:
            with torch.no_grad():
                scores = disc(torch.cat([logits, t.mean(0).float()]))
            d = _bce_with_logits64(scores, _discriminator_targets64(4))
            assert float(parts["d"]) == pytest.approx(float(d), rel=1e-5)
            assert float(parts["loss"]) == pytest.approx(float(kd + d), rel=1e-5)
        else:
            assert float(parts["loss"]) == pytest.approx(float(kd), rel=1e-5)


def _decode64(probs, classes, num_classes):
    """A bank record's full target: each top-K probability at its class, the rest shared by the other classes."""
    target = torch.empty(len(probs), num_classes, dtype=torch.float64)
    for b in range(len(probs)):
        top = dict(zip(classes[b].tolist(), probs[b].double().tolist(), strict=True))
        rest = max(1.0 - sum(top.values()), 0.0) / (num_classes - len(top))
        target[b] = torch.tensor([top.get(c, rest) for c in range(num_classes)], dtype=torch.float64)
    return target


def test_bank_loss_parts_are_the_float64_formulas_on_a_tiny_record(tmp_path):
    """From the bank: kd and kl to the decoded top-K record; D compares softmax(student) with that record."""
    cfg = tiny_config(tmp_path, **{"bank.path": str(tmp_path / "bank")})
    disc = Discriminator(NUM_CLASSES)
    objective = build_objective(cfg, discriminator=disc)
    assert type(objective) is MealV2FromBank and objective.discriminator is disc
    assert objective.part_names == ("loss", "kd", "d", "kl")
    torch.manual_seed(3)
    logits = 2 * torch.randn(3, NUM_CLASSES)
    probs = torch.tensor([[0.6, 0.3], [0.9, 0.05], [0.5, 0.49]], dtype=torch.float16)
    classes = torch.tensor([[2, 0], [4, 1], [1, 3]], dtype=torch.int16)
    parts = objective(logits, torch.zeros(3, dtype=torch.int64), {"probs": probs, "classes": classes})
    parts = {k: v.detach() for k, v in parts.items()}
    target = _decode64(probs, classes, NUM_CLASSES)
    log_q = _log_softmax64(logits)
    kd = -(target * log_q).sum(-1).mean()
    kl = (target * (target.log() - log_q)).sum(-1).mean()
    with torch.no_grad():
        scores = disc(torch.cat([torch.softmax(logits, -1), target.float()]))
    d = _bce_with_logits64(scores, _discriminator_targets64(3))
    assert float(parts["kd"]) == pytest.approx(float(kd), rel=1e-5)
    assert float(parts["kl"]) == pytest.approx(float(kl), rel=1e-4)
    assert float(parts["d"]) == pytest.approx(float(d), rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(float(kd + d), rel=1e-5)
    without_d = build_objective(tiny_config(tmp_path, **{"bank.path": "b", "loss.discriminator": "false"}))
    assert type(without_d) is MealV2FromBank and without_d.discriminator is None
    assert without_d.part_names == ("loss", "kd", "kl")


def test_the_configured_loss_impl_reaches_the_loss(tmp_path, monkeypatch):
    """loss.impl (here auto, where the losses' own default is torch) is what each mode's loss is asked to use; a
    MealV2 built without one uses auto, loss.impl's default."""
    seen = []

    def spy(loss):
        def wrapped(*args, impl):
            seen.append(impl)
            return loss(*args, impl=impl)
        return wrapped

    monkeypatch.setattr(objectives, "meal_v2_loss", spy(objectives.meal_v2_loss))
    monkeypatch.setattr(objectives, "bank_meal_v2_loss", spy(objectives.bank_meal_v2_loss))
    logits = torch.randn(2, NUM_CLASSES)
    for impl in ("auto", "torch"):
        online = build_objective(tiny_config(tmp_path, **{"loss.impl": impl}), teachers=make_teachers(),
                                 discriminator=None)
        online(logits, torch.zeros(2, dtype=torch.int64), {"teacher_logits": torch.randn(2, 2, NUM_CLASSES)})
    bank = build_objective(tiny_config(tmp_path, **{"loss.impl": "auto", "bank.path": "b"}), discriminator=None)
    bank(logits, torch.zeros(2, dtype=torch.int64),
         {"probs": torch.tensor([[0.5], [0.7]]), "classes": torch.tensor([[1], [2]])})
    default = MealV2(teachers=make_teachers(), discriminator=None)  # loss.impl's default, auto
    default(logits, torch.zeros(2, dtype=torch.int64), {"teacher_logits": torch.randn(2, 2, NUM_CLASSES)})
    assert seen == ["auto", "torch", "auto", "auto"]


def test_triton_is_refused_off_cuda_unless_interpreted(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    with pytest.raises(SetupError, match="loss.impl=triton runs its kernel on a CUDA GPU"):
        check_loss_impl("triton", cpu)
    with pytest.raises(SetupError, match="loss.impl=triton"):  # what building the online mode checks
        build_objective(tiny_config(tmp_path, **{"loss.impl": "triton"}), teachers=make_teachers())
    for impl in ("auto", "torch"):
        check_loss_impl(impl, cpu)
    check_loss_impl("triton", torch.device("cuda"))  # a device object only: nothing runs on it
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SetupError):
        check_loss_impl("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter runs Triton kernels on CPU tensors
    check_loss_impl("triton", cpu)


def test_the_online_mode_builds_the_configured_discriminator_and_teachers_for_the_step_batch(tmp_path, monkeypatch):
    from fastmeal.models import factory

    teachers, calls = make_teachers(), []

    def build_teachers(cfg, device, *, models=None, batch_sizes=()):
        calls.append((cfg, device, list(batch_sizes)))
        return teachers

    monkeypatch.setattr(factory, "build_teachers", build_teachers)
    cfg = tiny_config(tmp_path)
    objective = build_objective(cfg)
    assert type(objective) is MealV2 and objective.teachers is teachers
    assert calls == [(cfg, torch.device("cpu"), [cfg.data.batch_size])]  # the defaults: the CPU, data.batch_size
    disc = objective.discriminator
    assert type(disc) is Discriminator
    assert [(m.in_features, m.out_features) for m in disc.modules() if isinstance(m, nn.Linear)] == \
        [(NUM_CLASSES, 125), (125, 15), (15, 2)]
    # Another device and per-rank batch: the teachers capture for that batch, the discriminator moves there.
    on_meta = build_objective(cfg, device=torch.device("meta"), batch_size=3)
    assert calls[-1] == (cfg, torch.device("meta"), [3])
    assert {p.device.type for p in on_meta.discriminator.parameters()} == {"meta"}
    given = Discriminator(NUM_CLASSES)
    build_objective(cfg, device=torch.device("meta"), discriminator=given)
    assert {p.device.type for p in given.parameters()} == {"meta"}
    bank = build_objective(tiny_config(tmp_path, **{"bank.path": "b"}), device=torch.device("meta"))
    assert type(bank) is MealV2FromBank and bank.device == torch.device("meta") and len(calls) == 3
    assert type(bank.discriminator) is Discriminator
    assert {p.device.type for p in bank.discriminator.parameters()} == {"meta"}
    assert build_objective(tiny_config(tmp_path, **{"loss.discriminator": "false"})).discriminator is None


def test_only_the_online_mode_needs_teachers(tmp_path):
    assert needs_teachers(tiny_config(tmp_path)) is True
    assert needs_teachers(tiny_config(tmp_path, **{"loss.mode": "ce"})) is False
    assert needs_teachers(tiny_config(tmp_path, **{"bank.path": "b"})) is False  # the bank holds their soft labels


def test_the_discriminator_is_the_one_extra_param_group_and_the_online_mode_needs_teachers():
    disc = Discriminator(NUM_CLASSES)
    groups = MealV2(teachers=make_teachers(), discriminator=disc).param_groups()
    assert [g["name"] for g in groups] == ["discriminator"]
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in disc.parameters()]
    assert MealV2(teachers=make_teachers(), discriminator=None).param_groups() == []
    assert HardLabels().param_groups() == [] and HardLabels().discriminator is None
    assert Objective(disc).discriminator is disc
    with pytest.raises(SetupError, match="needs teachers"):
        MealV2(teachers=None, discriminator=disc)


def test_the_trained_model_runs_the_student_under_autocast_and_returns_its_logits_beside_the_loss():
    torch.manual_seed(4)
    student = SmallNet()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        fp32 = student(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = student(images)
    for dtype, expected in ((None, fp32), (torch.bfloat16, bf16)):
        model = TrainedModel(student, HardLabels(), autocast_dtype=dtype)
        assert model.student is student and type(model.objective) is HardLabels
        out = model(images, labels, {})
        assert set(out) == {"loss", "logits"}
        assert out["logits"].dtype == expected.dtype and torch.equal(out["logits"].detach(), expected)
        assert float(out["loss"].detach()) == pytest.approx(float(_ce64(expected, labels)), rel=1e-6)


def test_the_step_phases_are_named_for_the_profiler():
    """profiling.phase's names (teachers, student_fwd, loss) appear in a torch.profiler recording of a step."""
    objective = MealV2(teachers=make_teachers(), discriminator=None, impl="torch")
    model = TrainedModel(SmallNet(), objective)
    batch = Batch(torch.randn(2, 3, 16, 16), torch.zeros(2, dtype=torch.int64))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        objective.prepare(batch)
        model(batch.images, batch.labels, batch.targets)
    assert {"teachers", "student_fwd", "loss"} <= {e.name for e in prof.events()}


@pytest.mark.skipif("MUTANT_UNDER_TEST" in os.environ, reason="torch.compile cannot trace mutmut's trampolines")
def test_the_trained_model_compiles_to_one_graph_without_the_phases():
    """While torch.compile traces, the phases are nothing (their profiler check would break the graph): the step's
    forward compiles with fullgraph=True and equals eager."""
    torch.manual_seed(0)
    model = TrainedModel(SmallNet(), HardLabels())
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    eager = model(images, labels, {})
    compiled = torch.compile(model, backend="eager", fullgraph=True)(images, labels, {})
    for key in ("loss", "logits"):
        torch.testing.assert_close(compiled[key], eager[key], rtol=0, atol=0)

"""Training modes as objects: the registry picks one by ``loss.mode``; a new mode needs nothing in fastmeal/."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import NUM_CLASSES, SmallNet, make_teachers, make_trainer, tiny_config

from fastmeal import registry
from fastmeal.batch import Batch, cutmix_
from fastmeal.config import ConfigError
from fastmeal.data.plan import plan_cutmix
from fastmeal.metrics import read_jsonl
from fastmeal.models.discriminator import Discriminator
from fastmeal.objectives import HardLabels, MealV2, Objective, build_objective


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

"""The training loop on tiny CPU models: LR regime, a golden 3-step run, resume equivalence, checkpoints.

The models are tiny CNNs with BatchNorm (so train/eval mode and running statistics matter) and the
loaders are in-memory tensors with a seeded order per epoch: every run is deterministic, so the
resume tests compare parameters and optimiser state exactly.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmeal.batch import Batch, cutmix_
from fastmeal.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from fastmeal.config import ConfigError, build_config
from fastmeal.data.plan import plan_cutmix
from fastmeal.hooks import TrainerHook
from fastmeal.losses import meal_v2_loss
from fastmeal.metrics import read_jsonl
from fastmeal.models.discriminator import Discriminator
from fastmeal.objectives import MealV2, TrainedModel, build_objective
from fastmeal.trainer import Trainer, resolve_precision

NUM_CLASSES = 5
SIZE = 16


class TinyNet(nn.Module):
    """conv-BN-ReLU-pool-linear: a classifier with BatchNorm, ``num_classes`` like a timm model."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class TensorLoader:
    """The Loader protocol over in-memory tensors; the order is a seeded permutation per epoch."""

    backend = "memory"
    num_skipped = 0

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, device: str = "cpu") -> None:
        self.images, self.labels, self.batch_size, self.shuffle, self.seed = images, labels, batch_size, shuffle, seed
        self.device = torch.device(device)
        self.num_classes = NUM_CLASSES
        self.classes = tuple(f"c{i}" for i in range(NUM_CLASSES))
        self.dataset_size = self.num_samples = len(labels)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        n = len(self.labels)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
                 if self.shuffle else torch.arange(n))
        start, self.start_step = self.start_step, 0
        for i in range(start * self.batch_size, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            images = self.images[idx].to(self.device).contiguous(memory_format=torch.channels_last)
            yield images, self.labels[idx].to(self.device)


def make_data(num_train: int = 40, num_val: int = 13, batch_size: int = 8, device: str = "cpu"):
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(NUM_CLASSES, (num_train + num_val,), generator=g)
    # Class-dependent colour plus noise: learnable, so losses move.
    images = torch.randn(num_train + num_val, 3, SIZE, SIZE, generator=g) * 0.5
    images += (labels.float() / NUM_CLASSES).view(-1, 1, 1, 1)
    train = TensorLoader(images[:num_train], labels[:num_train], batch_size, device=device)
    val = TensorLoader(images[num_train:], labels[num_train:], 5, shuffle=False, device=device)
    return train, val


def make_teachers(seed: int = 7, device: str = "cpu"):
    torch.manual_seed(seed)
    teachers = [TinyNet(width=6).eval().to(device), TinyNet(width=4).eval().to(device)]
    for t in teachers:
        t.requires_grad_(False)

    def ensemble(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(x) for t in teachers])

    return ensemble


def tiny_config(tmp_path, **overrides):
    base = {
        "runtime.run_dir": str(tmp_path / "run"), "runtime.device": "cpu", "runtime.keep_last": 10,
        "model.num_classes": NUM_CLASSES, "model.pretrained": False,
        "precision.mode": "fp32", "precision.channels_last": "false",
        "loss.impl": "torch", "optim.lr": 0.1, "schedule.epochs": 2, "schedule.lr_steps": "",
        "logging.interval": 1, "logging.progress_bar": "false",
    }
    base.update({k: str(v) for k, v in overrides.items()})
    return build_config("demo", overrides=base)


def make_trainer(cfg, *, seed: int = 0, hooks=(), run_dir=None):
    torch.manual_seed(seed)
    student = TinyNet()
    discriminator = Discriminator(NUM_CLASSES) if cfg.loss.mode == "meal_v2" else None
    train, val = make_data()
    teachers = make_teachers() if cfg.loss.mode == "meal_v2" else None
    objective = build_objective(cfg, teachers=teachers, discriminator=discriminator)
    return Trainer(cfg, student=student, objective=objective, train_loader=train, val_loader=val, hooks=hooks,
                   run_dir=run_dir)


def assert_same_training_state(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), f"{name} differs"
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for key in sa["state"]:
        assert torch.equal(sa["state"][key]["momentum_buffer"], sb["state"][key]["momentum_buffer"]), key
    assert (a.epoch, a.step_in_epoch, a.global_step) == (b.epoch, b.step_in_epoch, b.global_step)


class LrRecorder(TrainerHook):
    def __init__(self):
        self.seen = []

    def after_step(self, trainer, parts):
        self.seen.append((trainer.epoch, [(g["name"], g["lr"]) for g in trainer.optimizer.param_groups]))


def test_lr_regime_per_epoch_for_every_group(tmp_path):
    cfg = tiny_config(tmp_path, **{"schedule.epochs": 3, "schedule.lr_steps": "1:0.01,2:0.001",
                                   "runtime.max_steps_per_epoch": 2})
    recorder = LrRecorder()
    make_trainer(cfg, hooks=[recorder]).fit()
    assert [e for e, _ in recorder.seen] == [0, 0, 1, 1, 2, 2]
    for epoch, groups in recorder.seen:
        assert [name for name, _ in groups] == ["student", "discriminator"]
        assert all(lr == cfg.lr_at(epoch) for _, lr in groups), (epoch, groups)
    assert [cfg.lr_at(e) for e in range(3)] == [0.1, 0.01, 0.001]
    epochs = read_jsonl(tmp_path / "run" / "metrics.jsonl", "epoch")
    assert [r["lr"] for r in epochs] == [0.1, 0.01, 0.001]


def test_golden_three_steps_match_a_hand_written_loop(tmp_path):
    cfg = tiny_config(tmp_path, **{"schedule.epochs": 1, "runtime.max_steps_per_epoch": 3, "optim.momentum": 0.9})
    trainer = make_trainer(cfg, seed=3)
    student, disc = copy.deepcopy(trainer.model.student), copy.deepcopy(trainer.model.objective.discriminator)
    teachers = make_teachers()
    train, _ = make_data()
    train.set_epoch(0)
    # The reference's step, written out: one SGD over student + D, loss = kd + d, one backward.
    opt = torch.optim.SGD([*student.parameters(), *disc.parameters()], lr=0.1, momentum=0.9, weight_decay=0.0)
    expected = []
    for step, (images, _) in enumerate(train):
        if step == 3:
            break
        images = images.contiguous()  # precision.channels_last=false: the trainer feeds NCHW
        with torch.no_grad():
            t = teachers(images)
        out = meal_v2_loss(student(images), t, disc, impl="torch")
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        expected.append({k: out[k].item() for k in ("loss", "kd", "d", "kl")})

    trainer.fit()
    logged = read_jsonl(tmp_path / "run" / "metrics.jsonl", "train")
    assert [r["global_step"] for r in logged] == [1, 2, 3]
    for got, want in zip(logged, expected, strict=True):
        for key in ("loss", "kd", "d", "kl"):
            # kl = kd - H(p) cancels: an fp32 ulp of kd is ~1e-7 absolute.
            assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
        assert got["loss"] == pytest.approx(got["kd"] + got["d"], rel=1e-6)
    assert expected[0]["loss"] != pytest.approx(expected[2]["loss"], rel=1e-4)  # the steps did move the model
    for x, y in zip(student.state_dict().values(), trainer.model.student.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_resume_two_epochs_equals_one_plus_one(tmp_path):
    straight = make_trainer(tiny_config(tmp_path / "a"))
    straight.fit()

    first = make_trainer(tiny_config(tmp_path / "b", **{"schedule.epochs": 1}))
    first.fit()
    # A different initialisation: everything must come from the checkpoint.
    second = make_trainer(tiny_config(tmp_path / "b"), seed=99)
    used = second.resume("auto")
    assert used is not None and (second.epoch, second.step_in_epoch) == (1, 0)
    second.fit()
    assert_same_training_state(straight, second)
    for key in ("top1", "top5", "loss", "count"):
        assert second.last_eval[key] == straight.last_eval[key]


def test_resume_mid_epoch_from_a_step_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path / "a", **{"schedule.epochs": 1, "runtime.checkpoint_every_steps": 2})
    straight = make_trainer(cfg)
    straight.fit()
    ckpts = CheckpointManager(tmp_path / "a" / "run" / "checkpoints").checkpoints()
    step2 = next(p for p in ckpts if p.name == "ckpt-000000002.pt")
    state = load_checkpoint(step2)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 2, 2)
    assert state["discriminator"] is not None and state["optimizer"]["state"]

    resumed = make_trainer(tiny_config(tmp_path / "b", **{"schedule.epochs": 1}), seed=5)
    resumed.resume(str(step2))
    resumed.fit()
    assert_same_training_state(straight, resumed)


def test_request_stop_writes_a_checkpoint_that_resumes(tmp_path):
    class StopAt(TrainerHook):
        def after_step(self, trainer, parts):
            if trainer.global_step == 3:
                trainer.request_stop("test")

    cfg = tiny_config(tmp_path)
    stopped = make_trainer(cfg, hooks=[StopAt()])
    summary = stopped.fit()
    assert summary["stopped"] == "test" and summary["global_step"] == 3
    resumed = make_trainer(cfg, seed=1)
    resumed.resume("auto")
    assert (resumed.epoch, resumed.step_in_epoch, resumed.global_step) == (0, 3, 3)
    resumed.fit()
    straight = make_trainer(tiny_config(tmp_path / "s"))
    straight.fit()
    assert_same_training_state(straight, resumed)


_KILLED_WRITER = textwrap.dedent("""
    import io, sys, time
    import torch
    from fastmeal.checkpoint import CheckpointManager, load_checkpoint

    directory, source, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    state = load_checkpoint(source)

    def save_then_hang(obj, f):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print("HALF-WRITTEN", flush=True)
        time.sleep(600)

    CheckpointManager(directory).save(state, global_step=step, save=save_then_hang)
""")


def test_killed_checkpoint_write_leaves_the_previous_one_and_resume_auto_uses_it(tmp_path, caplog):
    cfg = tiny_config(tmp_path)
    first = make_trainer(cfg)
    first.fit()  # 2 epochs of 5 steps: checkpoints at global steps 5 and 10
    directory = tmp_path / "run" / "checkpoints"
    manager = CheckpointManager(directory)
    assert [p.name for p in manager.checkpoints()] == ["ckpt-000000010.pt", "ckpt-000000005.pt"]

    # A real process killed (SIGKILL) halfway through writing the step-15 checkpoint.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(directory),
                             str(directory / "ckpt-000000010.pt"), "15"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "HALF-WRITTEN"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    leftovers = [p.name for p in directory.iterdir() if ".tmp-" in p.name]
    assert leftovers == [f".ckpt-000000015.pt.tmp-{proc.pid}"]
    assert not (directory / "ckpt-000000015.pt").exists()

    # And a newest file that was truncated after the fact (a bad copy).
    newest = (directory / "ckpt-000000010.pt").read_bytes()
    (directory / "ckpt-000000020.pt").write_bytes(newest[: len(newest) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(directory / "ckpt-000000020.pt")

    resumed = make_trainer(tiny_config(tmp_path, **{"schedule.epochs": 3}), seed=4)
    with caplog.at_level(logging.WARNING, logger="fastmeal"):
        used = resumed.resume("auto")
    assert used == directory / "ckpt-000000010.pt"
    assert "ckpt-000000020.pt" in caplog.text and "damaged" in caplog.text
    assert (directory / "damaged-ckpt-000000020.pt").is_file()  # kept, out of the way of resume and pruning
    assert_same_training_state(first, resumed)
    resumed.fit()  # removes the stale temporary file, trains epoch 2
    assert not [p for p in directory.iterdir() if ".tmp-" in p.name]
    assert resumed.epoch == 3


def test_resume_auto_with_only_damaged_checkpoints_fails_loudly(tmp_path):
    directory = tmp_path / "run" / "checkpoints"
    directory.mkdir(parents=True)
    (directory / "ckpt-000000004.pt").write_bytes(b"not a zip file")
    trainer = make_trainer(tiny_config(tmp_path))
    with pytest.raises(CheckpointError, match="every checkpoint"):
        trainer.resume("auto")


def test_resume_auto_without_checkpoints_starts_fresh(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path))
    assert trainer.resume("auto") is None and trainer.global_step == 0


def test_epoch_outputs_metrics_checkpoints_and_student_weights(tmp_path):
    cfg = tiny_config(tmp_path, **{"runtime.keep_last": 1, "logging.interval": 2})
    trainer = make_trainer(cfg)
    summary = trainer.fit()
    run = tmp_path / "run"
    assert summary["epochs"] == 2 and summary["global_step"] == 10
    assert (run / "config.json").read_text().strip() == cfg.to_json()
    assert [p.name for p in CheckpointManager(run / "checkpoints").checkpoints()] == ["ckpt-000000010.pt"]
    assert (run / "checkpoints" / "best.pt").is_file()
    best_step = min((r for r in read_jsonl(run / "metrics.jsonl", "epoch")), key=lambda r: -r["val_top1"])
    assert load_checkpoint(run / "checkpoints" / "best.pt")["global_step"] == best_step["global_step"]
    for stem in ("student_last", "student_best"):
        assert (run / f"{stem}.safetensors").is_file() and (run / f"{stem}.pth").is_file()
    state = load_checkpoint(run / "checkpoints" / "ckpt-000000010.pt")
    assert state["config"] == cfg.to_json()
    assert not [k for k in state if "teacher" in k]  # teachers are never saved (SPEC)
    assert set(state["rng"][0]) >= {"torch", "numpy", "python"}
    train_rows = read_jsonl(run / "metrics.jsonl", "train")
    # Logged every 2 steps and at each epoch's end (5 steps per epoch).
    assert [r["global_step"] for r in train_rows] == [2, 4, 5, 6, 8, 10]
    assert sum(r["samples"] for r in train_rows) == 2 * 40
    epochs = read_jsonl(run / "metrics.jsonl", "epoch")
    assert [r["val_count"] for r in epochs] == [13, 13]
    assert all(0 <= r["data_wait"] <= 1 and r["train_images_per_s"] > 0 for r in epochs)
    assert all(r["train_d"] > 0.3465 for r in epochs)  # the final ReLU's floor, ln(2)/2 (SPEC step 6)


def test_ce_mode_trains_without_teachers_or_discriminator(tmp_path):
    cfg = tiny_config(tmp_path, **{"loss.mode": "ce", "schedule.epochs": 1})
    trainer = make_trainer(cfg)
    assert not hasattr(trainer.objective, "teachers") and trainer.model.objective.discriminator is None
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["student"]
    trainer.fit()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl", "train")
    assert set(rows[0]) >= {"loss", "train_top1"} and "kd" not in rows[0]


def test_meal_v2_mode_needs_teachers_and_classes_must_agree(tmp_path):
    cfg = tiny_config(tmp_path)
    train, val = make_data()
    with pytest.raises(ValueError, match="needs teachers"):
        build_objective(cfg, teachers=None, discriminator=None)
    with pytest.raises(ValueError, match="model.num_classes=5"):
        Trainer(cfg, student=TinyNet(num_classes=3), objective=build_objective(cfg, teachers=make_teachers()),
                train_loader=train, val_loader=val)
    train.num_classes = 7
    with pytest.raises(ValueError, match="train split has 7 classes"):
        Trainer(cfg, student=TinyNet(), objective=build_objective(cfg, teachers=make_teachers()),
                train_loader=train, val_loader=val)


def test_cutmix_pastes_one_box_from_a_permutation():
    torch.manual_seed(0)
    images = torch.randn(6, 3, 20, 24)
    original = images.clone()
    for step in range(20):
        batch = cutmix_(Batch(images.clone(), torch.arange(6)), seed=0, epoch=1, step=step)
        mixed, lam, perm = batch.images, float(batch.targets["mix_lam"]), batch.targets["mix_perm"]
        changed = (mixed != original).any(1)  # [B, H, W]
        box = changed.any(0)
        ys, xs = box.nonzero(as_tuple=True)
        if len(ys) == 0:  # an empty box, or the identity permutation
            assert lam == 1.0 or torch.equal(perm, torch.arange(6))
            continue
        y1, y2, x1, x2 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        torch.testing.assert_close(mixed[:, :, y1:y2, x1:x2], original[perm][:, :, y1:y2, x1:x2], rtol=0, atol=0)
        outside = torch.ones(20, 24, dtype=torch.bool)
        outside[y1:y2, x1:x2] = False
        assert torch.equal(mixed[:, :, outside], original[:, :, outside])
        assert lam == pytest.approx(1 - float((y2 - y1) * (x2 - x1)) / (20 * 24))


def test_cutmix_training_step_sees_the_mixed_batch(tmp_path):
    seen = []
    ensemble = make_teachers()

    def teachers(x):
        seen.append(x.clone())
        return ensemble(x)

    cfg = tiny_config(tmp_path, **{"data.cutmix": "true", "schedule.epochs": 1, "runtime.max_steps_per_epoch": 1})
    train, val = make_data()
    torch.manual_seed(0)
    objective = build_objective(cfg, teachers=teachers, discriminator=Discriminator(NUM_CLASSES))
    trainer = Trainer(cfg, student=TinyNet(), objective=objective, train_loader=train, val_loader=None)
    trainer.fit()
    train.set_epoch(0)
    first_batch = next(iter(train))[0]
    mixed = cutmix_(Batch(first_batch.clone(), torch.zeros(len(first_batch), dtype=torch.int64)),
                    seed=cfg.runtime.seed, epoch=0, step=0).images
    assert len(seen) == 1 and not torch.equal(mixed, first_batch)
    assert torch.equal(seen[0], mixed)  # the teachers saw step 0's mix of the batch, not another one


def test_cutmix_hard_label_loss_is_lambda_ce_of_the_labels_plus_the_rest_ce_of_the_pasted_labels(tmp_path):
    """CE mode: ``loss = λ·CE(s, y) + (1-λ)·CE(s, y[perm])``, λ and ``perm`` from the keyed draw (plan_cutmix)."""
    cfg = tiny_config(tmp_path, **{"loss.mode": "ce", "data.cutmix": "true"})
    trainer = make_trainer(cfg)
    train, _ = make_data()
    train.set_epoch(0)
    checked = 0
    for step, (images, labels) in enumerate(train):
        _, (y1, y2, x1, x2), perm = plan_cutmix(cfg.runtime.seed, 0, step, len(labels), height=SIZE, width=SIZE)
        lam = 1 - (y2 - y1) * (x2 - x1) / SIZE**2  # the share of each image that is still its own
        perm = torch.from_numpy(perm)
        mixed = images.clone()
        mixed[:, :, y1:y2, x1:x2] = images[perm][:, :, y1:y2, x1:x2]
        student = copy.deepcopy(trainer.model.student)  # the weights the step starts from
        with torch.no_grad():
            log_q = torch.log_softmax(student(mixed).double(), -1)

        def ce(y, log_q=log_q):
            return -log_q.gather(1, y[:, None]).mean().item()

        want = lam * ce(labels) + (1 - lam) * ce(labels[perm])
        trainer.step_in_epoch = step
        loss = trainer.train_step(Batch(images, labels))["loss"].item()
        assert loss == pytest.approx(want, rel=1e-5, abs=1e-6), step
        # Only steps where λ and 1-λ swapped would give another loss can tell the two apart.
        if abs(want - ((1 - lam) * ce(labels) + lam * ce(labels[perm]))) > 1e-3:
            checked += 1
    assert checked >= 2


def test_fp16_grad_scaler_state_is_checkpointed_and_restored_on_the_cpu(tmp_path):
    # amp-fp16 runs a GradScaler on the CPU too. Its default scale (65536) is what a fresh scaler has, so the run
    # starts from another scale: a resume that ignored the checkpoint's scaler would then show.
    cfg = tiny_config(tmp_path, **{"precision.mode": "amp-fp16", "schedule.epochs": 1})
    trainer = make_trainer(cfg)
    assert trainer.scaler.is_enabled()
    trainer.scaler.scale(torch.ones(()))  # the scale tensor is created lazily
    trainer.scaler.update(new_scale=1024.0)
    trainer.fit()
    state = trainer.scaler.state_dict()
    assert state["scale"] <= 1024.0 and state["_growth_tracker"] > 0  # steps were taken with the set scale
    resumed = make_trainer(tiny_config(tmp_path, **{"precision.mode": "amp-fp16", "schedule.epochs": 2}))
    assert resumed.scaler.state_dict() != state
    resumed.resume("auto")
    assert resumed.scaler.state_dict() == state and resumed.global_step == trainer.global_step
    resumed.fit()
    assert resumed.epoch == 2


def test_resolve_precision():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == (None, False)
    assert resolve_precision("amp", cpu) == (None, False)  # CPU: amp means fp32 (bf16 autocast is slow there)
    assert resolve_precision("amp-bf16", cpu) == (torch.bfloat16, False)
    assert resolve_precision("amp-fp16", cpu) == (torch.float16, True)


def test_amp_bf16_step_runs_on_the_cpu(tmp_path):
    cfg = tiny_config(tmp_path, **{"precision.mode": "amp-bf16", "precision.channels_last": "true",
                                   "schedule.epochs": 1, "runtime.max_steps_per_epoch": 2})
    trainer = make_trainer(cfg)
    summary = trainer.fit()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl", "train")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert summary["last_eval"]["count"] == 13


def test_trained_model_gradient_reaches_the_student_through_the_discriminator():
    torch.manual_seed(0)
    student, disc = TinyNet(), Discriminator(NUM_CLASSES, final_relu=False)
    model = TrainedModel(student, MealV2(teachers=lambda x: torch.randn(2, 4, NUM_CLASSES), discriminator=disc,
                                         impl="torch"))
    batch = Batch(torch.randn(4, 3, SIZE, SIZE), torch.zeros(4, dtype=torch.int64))
    model.objective.prepare(batch)
    out = model(batch.images, batch.labels, batch.targets)
    (grad_d,) = torch.autograd.grad(out["d"], student.fc.weight)
    assert grad_d.abs().sum() > 0  # no detach between D and the student (SPEC step 9)
    assert out["logits"].shape == (4, NUM_CLASSES)


class LookupModel(nn.Module):
    """Returns stored logits for each sample; the sample index is written in pixel (0, 0, 0)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table
        self.calls_in_eval_mode = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls_in_eval_mode.append(not self.training)
        return self.table[images[:, 0, 0, 0].round().long()]


def test_evaluate_counts_every_image_once_with_known_predictions():
    from fastmeal.evaluate import evaluate

    num, classes = 23, 7
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(classes, (num,), generator=g)
    # Sample i ranks its true class at position rank[i] (0 = top): top-1 is rank 0, top-5 is rank < 5.
    ranks = torch.tensor([0, 1, 4, 5, 6, 0, 2, 0, 3, 6, 0, 0, 1, 5, 0, 4, 0, 2, 6, 0, 3, 0, 1])
    table = torch.empty(num, classes)
    for i in range(num):
        others = [c for c in range(classes) if c != labels[i]]
        order = others[: ranks[i]] + [int(labels[i])] + others[ranks[i]:]
        table[i, order] = torch.linspace(3.0, -3.0, classes)
    images = torch.zeros(num, 3, 4, 4)
    images[:, 0, 0, 0] = torch.arange(num, dtype=torch.float32)
    loader = TensorLoader(images, labels, batch_size=5, shuffle=False)  # 4 full batches and a partial one
    loader.num_classes = classes
    model = LookupModel(table).train()
    result = evaluate(model, loader, device=torch.device("cpu"), channels_last=False)
    assert result["count"] == num
    assert result["top1"] == pytest.approx(100.0 * (ranks == 0).sum().item() / num)
    assert result["top5"] == pytest.approx(100.0 * (ranks < 5).sum().item() / num)
    assert result["loss"] == pytest.approx(F.cross_entropy(table, labels).item(), rel=1e-6)
    assert all(model.calls_in_eval_mode) and model.training  # eval mode for the pass, then restored


def test_topk_with_fewer_classes_than_k():
    from fastmeal.metrics import topk_correct

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    assert topk_correct(logits, torch.tensor([1, 2]), (1, 5)).tolist() == [1.0, 2.0]


def test_optimizer_choices(tmp_path):
    from fastmeal.optim import build_optimizer

    trainer = make_trainer(tiny_config(tmp_path))
    opt = trainer.optimizer
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["foreach"] is True  # auto on the CPU
    assert (opt.defaults["momentum"], opt.defaults["nesterov"], opt.defaults["weight_decay"]) == (0.9, False, 0.0)
    plain = build_optimizer(tiny_config(tmp_path, **{"optim.impl": "torch"}), trainer.model, torch.device("cpu"))
    assert not plain.defaults.get("foreach") and not plain.defaults.get("fused")
    with pytest.raises(RuntimeError, match="optim.impl=apex needs CUDA"):
        build_optimizer(tiny_config(tmp_path, **{"optim.impl": "apex"}), trainer.model, torch.device("cpu"))


def test_tensorboard_request_without_tensorboard_names_the_install(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        trainer = make_trainer(tiny_config(tmp_path, **{"logging.tensorboard": "true"}))
        with pytest.raises(ConfigError, match="pip install tensorboard"):
            trainer.fit()
    else:  # with TensorBoard installed, scalars are written next to the JSONL
        trainer = make_trainer(tiny_config(tmp_path, **{"logging.tensorboard": "true", "runtime.max_steps_per_epoch": 1,
                                                        "schedule.epochs": 1}))
        trainer.fit()
        assert any((tmp_path / "run" / "tensorboard").iterdir())


def _gpu_trainer(tmp_path, **overrides):
    # An eager student unless a test asks for torch.compile: each compile of a new trainer costs seconds.
    cfg = tiny_config(tmp_path, **{"runtime.device": "cuda", "precision.channels_last": "true",
                                   "runtime.compile": "off", **overrides})
    torch.manual_seed(0)
    train, val = make_data(device="cuda")
    objective = build_objective(cfg, device=torch.device("cuda"), teachers=make_teachers(device="cuda"),
                                discriminator=Discriminator(NUM_CLASSES))
    return Trainer(cfg, student=TinyNet(), objective=objective, train_loader=train, val_loader=val)


@pytest.mark.gpu
def test_gpu_amp_bf16_with_fused_sgd(tmp_path):
    trainer = _gpu_trainer(tmp_path, **{"precision.mode": "amp-bf16", "schedule.epochs": 1})
    assert trainer.optimizer.defaults["fused"] is True and not trainer.scaler.is_enabled()
    summary = trainer.fit()
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl", "train")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and "peak_mem_gb" in rows[0]
    assert summary["last_eval"]["count"] == 13


@pytest.mark.gpu
def test_gpu_fp16_grad_scaler_state_is_checkpointed_and_restored(tmp_path):
    trainer = _gpu_trainer(tmp_path, **{"precision.mode": "amp-fp16", "schedule.epochs": 1})
    assert trainer.scaler.is_enabled()
    trainer.fit()
    scale = trainer.scaler.get_scale()
    resumed = _gpu_trainer(tmp_path, **{"precision.mode": "amp-fp16", "schedule.epochs": 2})
    resumed.resume("auto")
    assert resumed.scaler.get_scale() == scale and resumed.global_step == trainer.global_step
    resumed.fit()
    assert resumed.epoch == 2


@pytest.mark.gpu
def test_gpu_fp32_resume_equivalence(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    exact = {"precision.channels_last": "false", "runtime.cudnn_benchmark": "false"}  # autotuning is not deterministic
    straight = _gpu_trainer(tmp_path / "a", **exact)
    straight.fit()
    first = _gpu_trainer(tmp_path / "b", **{**exact, "schedule.epochs": 1})
    first.fit()
    second = _gpu_trainer(tmp_path / "b", **exact)
    second.resume("auto")
    second.fit()
    for (name, x), (_, y) in zip(straight.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)


# -- the optimiser's momentum buffers: a first step skipped by the grad scaler ----------------------------


def _poisoned_empty_like(monkeypatch):
    """``torch.empty_like`` that returns NaNs: uninitialised memory made visible (it is often zeros by luck)."""
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, *a, **k: real(t, *a, **k).fill_(float("nan")))


@pytest.mark.parametrize("fixed", [False, True])
def test_fused_sgd_first_step_overflow_with_a_grad_scaler(monkeypatch, fixed):
    """The fused kernel skips an overflowed step but SGD stores the buffers it allocated uninitialised."""
    from fastmeal.optim import init_momentum_buffers

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    start = copy.deepcopy(model.state_dict())
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    except (RuntimeError, ValueError) as err:  # torch builds without fused CPU kernels
        pytest.skip(f"fused SGD on the CPU: {err}")
    if fixed:
        init_momentum_buffers(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.randn(4, 6)
    _poisoned_empty_like(monkeypatch)
    scaler.scale(model(x).sum() * float("inf")).backward()  # step one overflows: the scaler skips it
    scaler.step(opt)
    scaler.update()
    monkeypatch.undo()
    assert scaler.get_scale() == 2.0**15
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # nothing was applied
    buffers = [opt.state[p]["momentum_buffer"] for p in model.parameters()]
    if not fixed:  # the bug, as torch has it: the next step would read this
        if not any(b.isnan().any() for b in buffers):
            pytest.skip("this torch initialises the fused SGD buffers of a skipped first step")
        return
    assert all(torch.equal(b, torch.zeros_like(b)) for b in buffers)
    opt.zero_grad()
    scaler.scale(model(x).square().sum()).backward()  # step two: as a first step from the same start
    scaler.step(opt)
    scaler.update()
    reference = nn.Linear(6, 3)
    reference.load_state_dict(start)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    reference(x).square().sum().backward()
    ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])


def test_build_optimizer_starts_every_momentum_buffer_at_zero(tmp_path):
    from fastmeal.optim import build_optimizer

    trainer = make_trainer(tiny_config(tmp_path))
    for impl in ("auto", "torch"):
        opt = build_optimizer(tiny_config(tmp_path, **{"optim.impl": impl}), trainer.model, torch.device("cpu"))
        params = [p for g in opt.param_groups for p in g["params"]]
        assert len(params) == len(list(trainer.model.parameters()))
        assert all(torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in params)


# -- cuDNN autotuning and torch.compile of the student's step ------------------------------------------------


def test_cudnn_benchmark_is_set_by_the_product_on_cuda_only(tmp_path, monkeypatch):
    import fastmeal.models.factory
    import fastmeal.trainer
    from fastmeal.distributed import configure_device

    before = torch.backends.cudnn.benchmark
    try:
        configure_device(True, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is True
        configure_device(False, torch.device("cuda"))
        assert torch.backends.cudnn.benchmark is False
        configure_device(True, torch.device("cpu"))  # the CPU: left alone
        assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before
    calls = []
    for module, who in ((fastmeal.trainer, "trainer"), (fastmeal.models.factory, "teachers")):
        monkeypatch.setattr(module, "configure_device", lambda flag, device, who=who: calls.append((who, flag)))
    make_trainer(tiny_config(tmp_path, **{"runtime.cudnn_benchmark": "false"}))
    cfg = build_config("demo", overrides={"model.teachers": "test_resnet"})
    fastmeal.models.factory.build_teachers(cfg, torch.device("cpu"), models=[TinyNet()])
    assert calls == [("trainer", False), ("teachers", True)]


def test_compile_setting():
    from fastmeal.trainer import compile_enabled

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compile_enabled("auto", cpu) and compile_enabled("auto", cuda)
    assert compile_enabled("on", cpu) and not compile_enabled("off", cuda)
    with pytest.raises(Exception, match="runtime.compile"):
        build_config("demo", overrides={"runtime.compile": "yes"})


def _steps(trainer: Trainer, num_steps: int = 3) -> list[float]:
    batches = iter(trainer.train_loader)
    losses = []
    for _ in range(num_steps):
        losses.append(float(trainer.train_step(Batch.of(next(batches)))["loss"]))
    return losses


def test_compiled_and_eager_steps_agree(tmp_path, monkeypatch):
    """torch.compile of the student's step (graph capture + AOT autograd; aot_eager: no codegen on a CPU)."""
    import fastmeal.trainer

    monkeypatch.setitem(fastmeal.trainer.COMPILE_OPTIONS, "backend", "aot_eager")
    torch._dynamo.reset()
    eager = make_trainer(tiny_config(tmp_path / "e", **{"runtime.compile": "off"}))
    compiled = make_trainer(tiny_config(tmp_path / "c", **{"runtime.compile": "on"}))
    assert not eager.compiled and compiled.compiled and compiled.train_model is not compiled.model
    eager_losses, compiled_losses = _steps(eager), _steps(compiled)
    assert compiled.compiled  # no fallback happened
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for (name, x), (_, y) in zip(eager.model.state_dict().items(), compiled.model.state_dict().items(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)
    assert list(compiled.training_state()["student"]) == list(eager.training_state()["student"])  # no _orig_mod.


def test_a_compile_failure_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch, caplog):
    import fastmeal.trainer

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(fastmeal.trainer.COMPILE_OPTIONS, "backend", broken_backend)
    torch._dynamo.reset()
    eager = make_trainer(tiny_config(tmp_path / "e", **{"runtime.compile": "off"}))
    trainer = make_trainer(tiny_config(tmp_path / "c", **{"runtime.compile": "on"}))
    with caplog.at_level(logging.WARNING, logger="fastmeal.trainer"):
        losses = _steps(trainer)
    assert not trainer.compiled and trainer.train_model is trainer.model
    assert caplog.text.count("torch.compile of the student's step failed") == 1
    assert "no compiler here" in caplog.text
    torch.testing.assert_close(losses, _steps(eager), rtol=1e-6, atol=1e-7)  # the failed step was redone eagerly
    for (name, x), (_, y) in zip(eager.model.state_dict().items(), trainer.model.state_dict().items(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.gpu
def test_gpu_fp16_first_step_overflow_leaves_zero_momentum_and_the_next_step_is_a_first_step(tmp_path):
    overrides = {"precision.mode": "amp-fp16", "runtime.compile": "off"}
    trainer = _gpu_trainer(tmp_path / "a", **overrides)
    assert trainer.optimizer.defaults["fused"] is True
    # A scale that overflows fp16 on the first step, then backs off to 1024 (the real first steps overflow too).
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**120, backoff_factor=2.0**-110)
    start = copy.deepcopy(trainer.model.state_dict())
    batches = iter(trainer.train_loader)
    first, second = next(batches), next(batches)
    trainer.train_step(Batch.of(first))
    assert trainer.scaler.get_scale() == 2.0**10
    params = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert all(torch.equal(trainer.optimizer.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in params)
    trainer.train_step(Batch.of(second))
    reference = _gpu_trainer(tmp_path / "b", **overrides)
    reference.model.load_state_dict(start)
    reference.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    reference.train_step(Batch.of(second))
    for (name, x), (_, y) in zip(reference.model.state_dict().items(), trainer.model.state_dict().items(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_gpu_compiled_student_step_matches_eager_and_sets_cudnn_benchmark(tmp_path):
    torch._dynamo.reset()
    eager = _gpu_trainer(tmp_path / "e", **{"runtime.compile": "off", "precision.mode": "fp32"})
    compiled = _gpu_trainer(tmp_path / "c", **{"precision.mode": "fp32", "runtime.compile": "auto"})  # on with CUDA
    assert compiled.compiled and torch.backends.cudnn.benchmark is True
    eager_losses, compiled_losses = _steps(eager), _steps(compiled)
    assert compiled.compiled, "torch.compile fell back to eager on the GPU (see the warning)"
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-3, atol=1e-5)
    for (name, x), (_, y) in zip(eager.model.state_dict().items(), compiled.model.state_dict().items(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-4, msg=name)


def test_compiled_cutmix_step_does_not_recompile_for_each_lambda(tmp_path, monkeypatch):
    """CE mode with CutMix: λ changes every step; the compiled step must not specialise on it."""
    import fastmeal.trainer

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    monkeypatch.setitem(fastmeal.trainer.COMPILE_OPTIONS, "backend", counting_backend)
    torch._dynamo.reset()
    overrides = {"loss.mode": "ce", "data.cutmix": "true"}
    eager = make_trainer(tiny_config(tmp_path / "e", **{**overrides, "runtime.compile": "off"}))
    compiled = make_trainer(tiny_config(tmp_path / "c", **{**overrides, "runtime.compile": "on"}))
    torch.manual_seed(5)
    eager_losses = _steps(eager, 1)
    torch.manual_seed(5)
    compiled_losses = _steps(compiled, 1)
    after_first = len(graphs)
    torch.manual_seed(6)
    eager_losses += _steps(eager, 3)
    torch.manual_seed(6)
    compiled_losses += _steps(compiled, 3)
    assert compiled.compiled and after_first >= 1 and len(graphs) == after_first
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)


def test_out_of_memory_is_not_a_compile_failure_and_names_the_batch(tmp_path, monkeypatch):
    import fastmeal.trainer
    from fastmeal.errors import OutOfMemoryError

    monkeypatch.setitem(fastmeal.trainer.COMPILE_OPTIONS, "backend", "aot_eager")
    torch._dynamo.reset()
    trainer = make_trainer(tiny_config(tmp_path, **{"runtime.compile": "on"}))

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer.train_model = out_of_memory
    with pytest.raises(OutOfMemoryError, match=r"of 8 images per rank \(data.batch_size=64 over 1 rank"):
        _steps(trainer, 1)
    assert trainer.compiled and trainer.compile_failure is None  # no eager fallback was tried


def test_a_compile_fallback_is_recorded_with_its_step_in_the_metrics(tmp_path, monkeypatch):
    import fastmeal.trainer

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setitem(fastmeal.trainer.COMPILE_OPTIONS, "backend", broken_backend)
    torch._dynamo.reset()
    trainer = make_trainer(tiny_config(tmp_path, **{"runtime.compile": "on", "schedule.epochs": 1}))
    trainer.fit()
    (event,) = read_jsonl(tmp_path / "run" / "metrics.jsonl", "compile_fallback")
    assert event["global_step"] == 0 and "no compiler here" in event["cause"]
    assert "no compiler here" in trainer.compile_failure

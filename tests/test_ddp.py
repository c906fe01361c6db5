"""DDP on the CPU: 2 gloo ranks against 1 process, sharded evaluation, batch-size errors.

How the equivalence test is made meaningful. Every rank gets the contiguous half of each *global*
batch that a 1-process run sees (``tiny.ShardedTensorLoader``), the teachers and the MEAL V2 loss
are per-sample means, and DDP averages the gradients of the two halves, so the two runs compute the
same update up to the order of fp32 additions. BatchNorm in training mode breaks this: each rank
normalises with the mean/variance of *its* half batch (SPEC: BN statistics per GPU, no SyncBN), so
the 2-rank forward is a different function of the data. The equivalence therefore uses a student
without BatchNorm (teachers are in eval mode, where BN is a fixed affine map), and a second run with
BatchNorm shows that the difference is then far above the tolerance, so the tolerance is not what
makes the first comparison pass.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from pathlib import Path

import pytest
import torch
from gloo_world import World, run_world
from tiny import cli_train_args, cli_worker, jpeg_dataset, make_trainer, teacher_files, tiny_config
from torch.nn.parallel import DistributedDataParallel

from fastmeal.checkpoint import CheckpointError
from fastmeal.config import ConfigError
from fastmeal.distributed import DistInfo, init_distributed

# fp32 sums regrouped (two half-batch means averaged by the all-reduce instead of one batch mean):
# ~1e-7 relative per step; after these 6 SGD steps with momentum they differ by < 1e-7 (measured 7e-8).
ATOL = 1e-6


def _fit_worker(rank: int, world_size: int, root: str, batchnorm: bool):
    init_distributed("cpu")
    run_dir = Path(root) / f"rank{rank}"  # one dir per rank: shows which ranks write
    trainer = make_trainer(tiny_config(run_dir), rank=rank, world_size=world_size, batchnorm=batchnorm)
    wrapped = trainer.train_model
    if world_size > 1:
        # Student and discriminator in ONE DDP wrapper (one all-reduce); the teachers outside it, unwrapped.
        assert isinstance(wrapped, DistributedDataParallel) and wrapped.module is trainer.model
        assert wrapped.gradient_as_bucket_view and wrapped.static_graph  # eager student: the graph is static
        in_ddp = {id(p) for p in wrapped.parameters()}
        trained = {id(p) for p in trainer.model.student.parameters()} | {
            id(p) for p in trainer.model.objective.discriminator.parameters()}
        assert in_ddp == trained
        assert not in_ddp & {id(p) for t in trainer.objective.teachers.models for p in t.parameters()}
        assert [g["name"] for g in trainer.optimizer.param_groups] == ["student", "discriminator"]
    summary = trainer.fit()
    out = {"state": {k: v.clone() for k, v in trainer.model.state_dict().items()}, "eval": summary["last_eval"],
           "global_step": summary["global_step"],
           "files": sorted(os.listdir(run_dir)) if run_dir.exists() else []}
    # Resuming with run dirs that differ per rank (a run dir not on a shared file system): every rank
    # must refuse, naming what each rank found, instead of rank 1 silently starting from scratch.
    again = make_trainer(tiny_config(run_dir), rank=rank, world_size=world_size, batchnorm=batchnorm)
    try:
        again.resume("auto")
        out["resume"] = "resumed"
    except CheckpointError as err:
        out["resume"] = str(err)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    one = run_world(_fit_worker, 1, str(tmp_path / "one"), False)[0]
    two = run_world(_fit_worker, 2, str(tmp_path / "two"), False)
    assert one["global_step"] == two[0]["global_step"] == two[1]["global_step"] == 6

    moved = _max_diff(one["state"], {k: v for k, v in make_trainer(tiny_config(tmp_path / "x")).model.state_dict()
                                     .items()})
    assert moved > 1e-2, "the parameters barely moved: the comparison would prove nothing"
    assert _max_diff(one["state"], two[0]["state"]) < ATOL
    assert _max_diff(two[0]["state"], two[1]["state"]) == 0.0  # DDP keeps the replicas identical

    # Sharded evaluation: 13 val images over 2 ranks (7 + 6), all-reduced: every image counted once,
    # and both ranks report the 1-process numbers (predictions agree to ATOL; counts exactly).
    for rank in (0, 1):
        assert two[rank]["eval"]["count"] == 13
        assert two[rank]["eval"]["top1"] == one["eval"]["top1"]
        assert two[rank]["eval"]["loss"] == pytest.approx(one["eval"]["loss"], abs=1e-5)

    # Rank 0 alone writes: config, metrics, checkpoints, student weights.
    assert {"checkpoints", "config.json", "metrics.jsonl", "student_last.pth"} <= set(two[0]["files"])
    assert two[1]["files"] == []
    for rank in (0, 1):
        assert two[rank]["resume"].startswith("the ranks disagree on the checkpoint to resume from (resume=auto) "
                                              "(rank 0: 'ckpt-000000006.pt'; rank 1: None)")
        assert "must be on a file system every node sees" in two[rank]["resume"]


def test_batchnorm_statistics_per_rank_break_equality_and_ranks_still_agree(tmp_path):
    one = run_world(_fit_worker, 1, str(tmp_path / "one"), True)[0]
    two = run_world(_fit_worker, 2, str(tmp_path / "two"), True)
    # Per-rank batch statistics: a different function of the data, far above the tolerance above.
    assert _max_diff(one["state"], two[0]["state"]) > 100 * ATOL
    # Yet every rank holds rank 0's running statistics after the epoch (broadcast before evaluation),
    # so both evaluate, and would save, the same model.
    assert _max_diff(two[0]["state"], two[1]["state"]) == 0.0
    assert two[0]["eval"] == pytest.approx({**two[1]["eval"], "seconds": two[0]["eval"]["seconds"],
                                            "images_per_s": two[0]["eval"]["images_per_s"]})


def _eval_worker(rank: int, world_size: int, data: str):
    import timm

    from fastmeal.data import build_loader
    from fastmeal.evaluate import evaluate

    init_distributed("cpu")
    cfg = tiny_config("unused", **{"data.root": data, "data.image_size": 32, "data.eval_batch_size": 4,
                                   "data.workers": 0, "data.backend": "torchvision", "model.num_classes": 3})
    torch.manual_seed(0)  # the same model on every rank
    model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    loader = build_loader(cfg, "val", rank=rank, world_size=world_size, device=torch.device("cpu"))
    result = evaluate(model, loader, device=torch.device("cpu"), channels_last=False, all_ranks=world_size > 1)
    return loader.num_samples, loader.dataset_size, result


def test_sharded_evaluation_of_an_odd_val_set_counts_every_image_once(tmp_path):
    data = jpeg_dataset(tmp_path / "data", train_per_class=1, val_per_class=3)  # 9 val images
    one = run_world(_eval_worker, 1, str(data))[0]
    two = run_world(_eval_worker, 2, str(data))
    assert one[:2] == (9, 9)
    assert [r[0] for r in two] == [5, 4]  # rank 0 reads images 0, 2, 4, 6, 8; rank 1 reads 1, 3, 5, 7
    for _, size, result in two:
        assert size == 9 and result["count"] == 9
        assert result["top1"] == one[2]["top1"] and result["top5"] == one[2]["top5"]
        assert result["loss"] == pytest.approx(one[2]["loss"], rel=1e-5)


def test_global_batch_not_divisible_fails_at_start_up(tmp_path):
    cfg = tiny_config(tmp_path, **{"data.batch_size": 6})
    from fastmeal.run import build_trainer

    with pytest.raises(ConfigError, match=r"data.batch_size=6 \(the global batch\) is not divisible by the world "
                                          r"size 4; choose a multiple of 4, e.g. 4 or 8"):
        build_trainer(cfg, dist=DistInfo(rank=0, world_size=4))


def _cli_alone_in_a_world_of_four(rank: int, world_size: int, args: list[str]):  # noqa: ARG001
    from fastmeal.cli import main

    os.environ["WORLD_SIZE"] = "4"  # as torchrun --nproc-per-node 4 would say; ranks 1-3 never start
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        return main(args), stderr.getvalue()


def test_global_batch_not_divisible_fails_on_the_command_line_before_waiting_for_peers(tmp_path):
    args = ["train", "--preset", "demo", "--set", "data.batch_size=6", "--set", "runtime.device=cpu",
            "--set", f"data.root={tmp_path}", "--set", f"runtime.run_dir={tmp_path / 'run'}"]
    start = time.monotonic()
    # Alone in a world of 4: had it joined the process group first, it would wait for ranks 1-3.
    rc, stderr = run_world(_cli_alone_in_a_world_of_four, 1, args, timeout=60)[0]
    assert rc == 2
    assert stderr.strip() == ("fastmeal: config error: data.batch_size=6 (the global batch) is not divisible by the "
                              "world size 4; choose a multiple of 4, e.g. 4 or 8")
    assert time.monotonic() - start < 60


def test_fastmeal_train_on_two_ranks_end_to_end(tmp_path):
    """``fastmeal train`` as torchrun runs it (one process per rank, the world in the environment)."""
    data = jpeg_dataset(tmp_path / "data", train_per_class=4, val_per_class=3)  # 12 train, 9 val
    teachers = teacher_files(tmp_path / "weights")
    run_dir = tmp_path / "run"
    args = cli_train_args(data, teachers, run_dir, "schedule.epochs=1")
    world = World(cli_worker, 2, args)
    results = world.results(timeout=240)
    summaries = [json.loads(out) for rc, out in results if rc == 0]
    assert len(summaries) == 2, results
    for summary in summaries:
        assert summary["global_step"] == 3  # 12 images, global batch 4: 2 per rank, 6 per rank and epoch
        assert summary["last_eval"]["count"] == 9
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if r["kind"] == "train"] == [1, 2, 3]  # written once, by rank 0
    assert sum(r["samples"] for r in records if r["kind"] == "train") == 12  # both ranks' samples counted

    # Two more epochs from the end of the first, on both ranks.
    args = cli_train_args(data, teachers, run_dir, "schedule.epochs=2") + ["--resume", "auto"]
    results = World(cli_worker, 2, args).results(timeout=240)
    summaries = [json.loads(out) for rc, out in results if rc == 0]
    assert len(summaries) == 2, results
    for summary in summaries:
        assert summary["resumed_from"] == str(run_dir / "checkpoints" / "ckpt-000000003.pt")
        assert summary["global_step"] == 6

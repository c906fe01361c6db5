"""Weights on an offline machine (issue #23 item 12): the listing, the fetch layout, and timm loading from it.

The hub cannot be reached here, so the test writes the files itself in the layout `fastmeal weights fetch`
produces (huggingface_hub's cache: ``DIR/models--timm--<tag>/snapshots/<revision>/model.safetensors`` with
``refs/main``), then loads them in a fresh process with ``HF_HUB_CACHE=DIR HF_HUB_OFFLINE=1``, as on the node.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from fastmeal.config import build_config
from fastmeal.models import factory

TAG = "test_resnet.r160_in1k"  # a tiny timm model whose pretrained weights live at timm/test_resnet.r160_in1k


def write_hub_cache(cache, repo: str, state_dict, revision: str = "0123456789abcdef0123456789abcdef01234567"):
    """The files huggingface_hub.hf_hub_download leaves in ``cache`` for ``repo``'s model.safetensors."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, snapshot / "model.safetensors")
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot / "model.safetensors"


def _env(cache):
    return {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "RANK": "0"}


def test_list_then_offline_training_loads_the_fetched_files(tmp_path):
    torch.manual_seed(3)
    reference = timm.create_model("test_resnet").state_dict()  # the tag's own head (1000 classes)
    cache = tmp_path / "weights"
    overrides = ["--set", f"model.student={TAG}", "--set", "model.pretrained=true", "--set", "model.num_classes=1000",
                 "--set", f"model.teachers={TAG},{TAG}"]
    fastmeal = [sys.executable, "-m", "fastmeal"]
    listed = subprocess.run([*fastmeal, "weights", "list", "--preset", "demo", *overrides], env=_env(cache),
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.count("MISSING") == 3 and "3 missing here" in listed.stdout
    write_hub_cache(cache, f"timm/{TAG}", reference)
    listed = subprocess.run([*fastmeal, "weights", "list", "--preset", "demo", *overrides], env=_env(cache),
                            capture_output=True, text=True, timeout=300)
    assert "MISSING" not in listed.stdout and "0 missing here" in listed.stdout and str(cache) in listed.stdout
    # What a run on the node does: the student and both teachers come from the cache, offline.
    code = ("import json, sys, torch\n"
            "from fastmeal.config import build_config\n"
            "from fastmeal.models.factory import build_student, build_teacher_models\n"
            f"cfg = build_config('demo', overrides={{'model.student': '{TAG}', 'model.pretrained': 'true', "
            f"'model.num_classes': 1000, 'model.teachers': '{TAG},{TAG}'}})\n"
            "models = [build_student(cfg), *build_teacher_models(cfg)]\n"
            "torch.save([m.state_dict() for m in models], sys.argv[1])\n")
    out = tmp_path / "loaded.pt"
    run = subprocess.run([sys.executable, "-c", code, str(out)], env=_env(cache), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    for state in torch.load(out):
        assert state.keys() == reference.keys()
        assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_offline_run_lists_every_missing_file_at_once(tmp_path):
    code = ("from fastmeal.config import build_config\n"
            "from fastmeal.models.factory import build_teacher_models\n"
            f"build_teacher_models(build_config('demo', overrides={{'model.num_classes': 1000, "
            f"'model.teachers': '{TAG},test_efficientnet.r160_in1k'}}))\n")
    run = subprocess.run([sys.executable, "-c", code], env=_env(tmp_path / "empty"), capture_output=True, text=True,
                         timeout=300)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode != 0 and "2 weights file(s)" in last
    assert f"timm/{TAG}" in last and "timm/test_efficientnet.r160_in1k" in last


def test_fetch_downloads_each_hub_file_into_the_folder(tmp_path):
    from huggingface_hub.errors import EntryNotFoundError

    cfg = build_config("demo", overrides={"model.student": TAG, "model.pretrained": "true",
                                          "model.teachers": f"{TAG},test_byobnet@{tmp_path / 'own.pth'}"})
    calls = []

    def download(*, repo_id, filename, cache_dir):  # hf_hub_download's keywords
        calls.append((repo_id, filename, cache_dir))
        if filename == "model.safetensors" and len(calls) == 1:
            raise EntryNotFoundError("no safetensors in this repo")  # falls back to pytorch_model.bin
        return str(tmp_path / filename)

    fetched = factory.fetch_weights(factory.weight_sources(cfg), tmp_path / "dir", download=download)
    assert [(s.key, p.name) for s, p in fetched] == [("model.student", "pytorch_model.bin"),
                                                      ("model.teachers[0]", "model.safetensors")]
    assert calls == [(f"timm/{TAG}", "model.safetensors", str(tmp_path / "dir")),
                     (f"timm/{TAG}", "pytorch_model.bin", str(tmp_path / "dir")),
                     (f"timm/{TAG}", "model.safetensors", str(tmp_path / "dir"))]  # the local file is not fetched
    with pytest.raises(factory.WeightsError, match="failed"):
        factory.fetch_weights(factory.weight_sources(cfg)[:1], tmp_path / "dir",
                              download=lambda **kw: (_ for _ in ()).throw(OSError("offline")))

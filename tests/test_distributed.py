"""Two CPU processes (torchrun, gloo): DDP training with PGP keeps every rank identical.

`tests/scripts/dist_worker.py` runs a 2-task DualPrompt-PGP `train_continual` on each rank and
writes the rank's bases, adapter tensors, accuracy matrices and the labels its evaluations gathered.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "scripts" / "dist_worker.py"


def run_two_ranks(out: Path, method: str = "dualprompt"):
    torchrun = shutil.which("torchrun")
    command = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    command += ["--standalone", "--nproc_per_node", "2", str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PGP_TINY_METHOD": method}
    env.pop("PGP_KILL_AT", None)
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    infos = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    tensors = [load_file(str(out / f"rank{r}.safetensors")) for r in (0, 1)]
    return infos, tensors


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return run_two_ranks(tmp_path_factory.mktemp("ddp"))


def test_runs_as_two_gloo_processes(two_ranks):
    infos, _ = two_ranks
    assert [i["rank"] for i in infos] == [0, 1]
    for info in infos:
        assert info["num_processes"] == 2
        assert info["distributed_type"] == "DistributedType.MULTI_CPU"
        assert info["backend"] == "gloo"


def test_bases_are_bitwise_equal_across_ranks_and_built_from_all_samples(two_ranks):
    infos, tensors = two_ranks
    bases = [{k: v for k, v in t.items() if k.startswith("basis.")} for t in tensors]
    assert bases[0].keys() == bases[1].keys() and bases[0]
    assert all(v.shape[1] > 0 for v in bases[0].values())
    for name in bases[0]:
        assert torch.equal(bases[0][name], bases[1][name]), name
    # Each rank streamed half of each task's 24 memory samples ...
    assert [info["memory_rows"] for info in infos] == [[12, 12], [12, 12]]
    # ... and the reduced bases equal a single process's bases from all 24 (projectors, float64).
    for info in infos:
        assert len(info["projector_gaps"]) == 2
        assert max(info["projector_gaps"]) < 1e-6, info["projector_gaps"]


def test_parameters_are_equal_after_training(two_ranks):
    _, tensors = two_ranks
    adapters = [{k: v for k, v in t.items() if k.startswith("adapter.")} for t in tensors]
    assert adapters[0].keys() == adapters[1].keys()
    assert "adapter.prefix_pool.e_prompt" in adapters[0] and "adapter.head.weight" in adapters[0]
    assert [k for k in adapters[0] if not torch.equal(adapters[0][k], adapters[1][k])] == []


def test_both_ranks_report_the_same_accuracy_over_every_test_sample(two_ranks):
    infos, _ = two_ranks
    assert infos[0]["accuracy"] == infos[1]["accuracy"]
    assert infos[0]["task_il_accuracy"] == infos[1]["task_il_accuracy"]
    values = infos[0]["accuracy"]["values"]
    assert values[1][0] is None and all(v is not None for v in (values[0][0], values[0][1], values[1][1]))
    # Evaluations in order: task 0 after task 0; tasks 0 and 1 after task 1. Each gathered every test
    # sample exactly once (10 rows over 2 ranks in batches of 3: the padding must be dropped).
    test_labels = infos[0]["test_labels"]
    expected = [test_labels[0], test_labels[0], test_labels[1]]
    for info in infos:
        assert [sorted(g) for g in info["gathered_labels"]] == [sorted(e) for e in expected]
        assert [len(g) for g in info["gathered_labels"]] == [10, 10, 10]


def test_lora_ranks_hold_identical_bases_parameters_and_accuracy(tmp_path):
    """LoRA-PGP under DDP: the LoRA matrices live inside the backbone's modules, and DDP must still keep them,
    the bases (built from both ranks' memory shards) and the accuracies identical on both ranks."""
    infos, tensors = run_two_ranks(tmp_path, method="lora")
    assert [info["memory_rows"] for info in infos] == [[12, 12], [12, 12]]
    assert max(max(info["projector_gaps"]) for info in infos) < 1e-6
    assert tensors[0].keys() == tensors[1].keys()
    assert "adapter.lora.layers.0.attention.q_proj.lora_A.weight" in tensors[0]
    assert any(k.startswith("basis.layers.4.attention.v_proj.lora_B") for k in tensors[0])
    assert [k for k in tensors[0] if not torch.equal(tensors[0][k], tensors[1][k])] == []
    assert (
        float(tensors[0]["adapter.lora.layers.4.attention.v_proj.lora_B.weight"].abs().sum()) > 0
    )  # trained
    assert infos[0]["accuracy"] == infos[1]["accuracy"]

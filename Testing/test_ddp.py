"""A real 2-process torchrun (gloo) training run: both ranks must end identical, and equal a 1-process run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from CTReasonerLib.train.metrics_log import read_metrics
from CTReasonerLib.train.trainer import Trainer

from fixtures_train import RegressionSamples, TwoHeadRegressor, regressor_config

WORKER = Path(__file__).resolve().parent / "ddp_train_worker.py"
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path)]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-4000:]

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (rank0["world_size"], rank0["backend"]) == (2, "gloo")
    assert rank0["steps"] == rank1["steps"] == 4  # 16 samples / 2 ranks / batch 2 = 4 micro-batches -> 2 steps/epoch
    for key, value in rank0["weights"].items():
        assert torch.equal(value, rank1["weights"][key]), key

    # Rank 0 alone logs and checkpoints.
    run = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl", "train")] == [1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]

    # DistributedSampler interleaves one permutation, so ranks' batches of 2 together are the
    # single-process batch of 4: averaged DDP gradients must reproduce the 1-process run.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    single = TwoHeadRegressor(dropout=0.0)
    config = regressor_config(str(tmp_path / "single"), epochs=2, batch_size=4, grad_accum_steps=2)
    Trainer(single, config, RegressionSamples(count=16)).train()
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0["weights"][key], value, rtol=1e-5, atol=1e-6)


def test_a_config_error_under_torchrun_is_one_clear_message_per_rank(tmp_path):
    """Both ranks stop at the same problem: each says what is wrong, and leaves its group without aborting."""
    config = tmp_path / "missing_data.yaml"
    config.write_text("model:\n  source: tiny\ndata:\n  root: %s\noutput_dir: %s\n"
                      % (tmp_path / "nowhere", tmp_path / "run"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "CTReasonerLib.cli", "train", str(config), "--device", "cpu"]
    completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert completed.stderr.count("does not exist") == 2, completed.stderr[-3000:]
    assert "terminate called" not in completed.stderr and "SIGABRT" not in completed.stderr

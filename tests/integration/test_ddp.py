"""Integration tests of data-parallel training (torch DDP with gloo on CPU) against one process.

Covers: two ranks with batch 2 each log the same per-step training loss and validation CE as one
process with batch 4 on the same data order. The regularizer starts at step 2, so the thresholds get
no gradient before it and DDP searches for unused parameters. A slow variant starts it at step 0,
where every parameter gets a gradient. Only rank 0 creates an MLflow run.
The two ranks are started the way torchrun starts them (WORLD_SIZE, RANK and LOCAL_RANK in the
environment) and meet through a file store, so no TCP store listens on any interface; gloo's own
sockets use the loopback interface (GLOO_SOCKET_IFNAME=lo).
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from harness.train import main_train

pytestmark = pytest.mark.integration

CORPUS = str(Path(sysconfig.get_paths()["stdlib"]) / "email")
STEPS = 6


def _overrides(folder: Path, start_step: int) -> list[str]:
    return [
        f"data.corpus={CORPUS}", "data.vocab_size=300", f"data.cache_dir={folder / 'cache'}",
        f"train.max_steps={STEPS}", "train.eval_interval=3", "train.eval_batches=2", "train.device=cpu",
        f"train.out_dir={folder / 'runs'}", "tracking.log_model=false",
        "entropy.loss_coeff=1e-3", f"entropy.start_step={start_step}",
    ]


def _run_two_ranks(folder: Path, overrides: list[str]) -> list[subprocess.CompletedProcess]:
    """Start two ranks of `harness train` as torchrun would and wait for both."""
    cmd = [sys.executable, "-m", "harness.cli", "train", "tiny", *overrides]
    store = folder / "dist-store"
    procs = []
    for rank in range(2):
        env = {**os.environ, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "HARNESS_DIST_INIT_METHOD": store.as_uri(), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=240)
        finally:
            proc.kill()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out))
    return results


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


# start_step=2 covers both DDP paths in one run; start_step=0 (no unused parameter search) is the slow variant
@pytest.mark.parametrize("start_step", [2, pytest.param(0, marks=pytest.mark.slow)])
def test_ddp_matches_single_process(tmp_path, monkeypatch, mlflow_db, start_step):
    uri = mlflow_db(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)

    # one process, batch 4 (this also builds the data cache the ranks read)
    assert main_train("tiny", [*_overrides(tmp_path, start_step), "train.batch_size=4", "name=single"]) == 0

    # two ranks, batch 2 each: the same global batch of 4
    results = _run_two_ranks(tmp_path, [*_overrides(tmp_path, start_step), "train.batch_size=2", "name=ddp"])
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank} failed:\n{result.stdout[-3000:]}"

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("entropy-harness")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["ddp", "single"]
    assert runs["ddp"].info.status == "FINISHED"
    single_id, ddp_id = runs["single"].info.run_id, runs["ddp"].info.run_id

    single_loss, ddp_loss = _history(client, single_id, "train/loss"), _history(client, ddp_id, "train/loss")
    assert sorted(ddp_loss) == list(range(1, STEPS + 1))
    for step, value in single_loss.items():
        assert ddp_loss[step] == pytest.approx(value, rel=1e-4), f"train/loss differs at step {step}"
    single_entropy = _history(client, single_id, "train/entropy_loss")
    ddp_entropy = _history(client, ddp_id, "train/entropy_loss")
    for step, value in single_entropy.items():
        assert ddp_entropy[step] == pytest.approx(value, rel=1e-4, abs=1e-6), f"train/entropy_loss differs at step {step}"
    single_val, ddp_val = _history(client, single_id, "val/ce"), _history(client, ddp_id, "val/ce")
    assert sorted(ddp_val) == [0, 3, 6]
    for step, value in single_val.items():
        assert ddp_val[step] == pytest.approx(value, rel=1e-4), f"val/ce differs at step {step}"
    assert runs["ddp"].data.metrics["test/ppl"] == pytest.approx(runs["single"].data.metrics["test/ppl"], rel=1e-4)
    assert (tmp_path / "runs" / "ddp" / "checkpoints" / "latest").is_file()

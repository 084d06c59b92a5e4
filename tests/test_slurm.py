"""launch.slurm and slurm/torchrun_smoke.sh: node-list parsing and the
variable mapping without SLURM, then a real sbatch -> srun -> torchrun job on
a local single-node cluster (tests/slurm_cluster.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.env import find_free_port
from launch.slurm import SlurmEnvError, TorchrunSettings, first_host, main, torchrun_settings
from tests.slurm_cluster import slurm_cluster  # noqa: F401  (pytest fixture)

REPO = Path(__file__).resolve().parents[1]
NODELISTS = {
    "node[001-004,010]": "node001",
    "gpu-a[1-2],gpu-b3": "gpu-a1",
    "gpu-b3,gpu-a[1-2]": "gpu-b3",
    "login7": "login7",
}


@pytest.mark.parametrize("nodelist,first", sorted(NODELISTS.items()))
def test_first_host_parsed_without_scontrol(nodelist, first):
    assert first_host(nodelist, use_scontrol=False) == first


def test_settings_multi_node_from_slurm_variables():
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu-a[1-2],gpu-b3",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_NODEID": "2",
        "SLURM_GPUS_ON_NODE": "4",
    }
    got = torchrun_settings(env, use_scontrol=False)
    assert got == TorchrunSettings("gpu-a1", 15000 + 4242 % 20000, 3, 2, 4)
    # What bash sees after eval, quoting included.
    exports = TorchrunSettings("host with space", 1234, 2, 1, 8).export_lines()
    out = subprocess.run(
        ["bash", "-c", 'eval "$LINES"; echo "$MASTER_ADDR|$MASTER_PORT|$NNODES|$NODE_RANK|$NPROC_PER_NODE"'],
        env={"LINES": exports, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, check=True,
    )
    assert out.stdout.strip() == "host with space|1234|2|1|8"


def test_settings_explicit_values_win_and_single_node_is_loopback():
    base = {"SLURM_JOB_ID": "7", "SLURM_NODELIST": "node[3-4]", "SLURM_NNODES": "1"}
    assert torchrun_settings(base, use_scontrol=False) == TorchrunSettings("127.0.0.1", 15007, 1, 0, 1)
    env = dict(base, SLURM_NNODES="2", MASTER_ADDR="10.0.0.5", MASTER_PORT="29999",
               NPROC_PER_NODE="3", SLURM_GPUS_ON_NODE="8")
    assert torchrun_settings(env, use_scontrol=False) == TorchrunSettings("10.0.0.5", 29999, 2, 0, 3)
    env = dict(base, SLURM_NNODES="2", SLURM_GPUS_ON_NODE="2")
    assert torchrun_settings(env, use_scontrol=False).master_addr == "node3"


def test_settings_errors_name_the_variable(monkeypatch, capsys):
    with pytest.raises(SlurmEnvError, match="SLURM_JOB_NODELIST"):
        torchrun_settings({}, use_scontrol=False)
    env = {"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_NUM_NODES": "two"}
    with pytest.raises(SlurmEnvError, match=r"\$SLURM_JOB_NUM_NODES='two'"):
        torchrun_settings(env, use_scontrol=False)
    env.update(SLURM_JOB_NUM_NODES="2", SLURM_NODEID="2")
    with pytest.raises(SlurmEnvError, match="SLURM_NODEID=2 is outside"):
        torchrun_settings(env, use_scontrol=False)
    for name in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST"):
        monkeypatch.delenv(name, raising=False)
    assert main(["env"]) == 2
    assert "run inside an sbatch/salloc allocation" in capsys.readouterr().err


def test_parser_agrees_with_scontrol(slurm_cluster):
    for nodelist in NODELISTS:
        out = slurm_cluster.run(["scontrol", "show", "hostnames", nodelist]).stdout.split()
        assert first_host(nodelist, use_scontrol=False) == out[0], nodelist


def test_partition_limits_are_enforced(slurm_cluster, tmp_path):
    # EnforcePartLimits=ALL + a 2-CPU node: an impossible request fails at submit.
    proc = slurm_cluster.run(
        ["sbatch", "--cpus-per-task=4", f"--output={tmp_path}/x.out", "--wrap=true"], check=False
    )
    assert proc.returncode != 0
    assert "More processors requested than permitted" in proc.stderr, proc.stderr


def _job_record(cluster, job_id: str) -> dict:
    """``scontrol show job`` as a dict; {} once the record has aged out (MinJobAge)."""
    proc = cluster.run(["scontrol", "show", "job", "-o", job_id], check=False)
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout)) if proc.returncode == 0 else {}


def test_sbatch_torchrun_smoke_one_node_two_ranks(slurm_cluster, tmp_path):
    result = tmp_path / "smoke.json"
    output = tmp_path / "job.out"
    exports = {
        "PYTHON": sys.executable,
        "REPO_DIR": str(REPO),
        "NPROC_PER_NODE": "2",
        "SLURM_SMOKE_RESULT": str(result),
        "MASTER_PORT": str(find_free_port()),  # the job-id rule is unit-tested above
    }
    proc = slurm_cluster.run(
        ["sbatch", "--wait", "--parsable", "--nodes=1", "--cpus-per-task=2", "--time=00:03:00",
         f"--output={output}", f"--chdir={REPO}",
         "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()),
         str(REPO / "slurm" / "torchrun_smoke.sh")],
        timeout=240, check=False,
    )
    log = output.read_text(errors="replace") if output.exists() else "(no job output)"
    assert proc.returncode == 0, f"{proc.stderr}\njob output:\n{log}\n{slurm_cluster.log_tails()}"
    job_id = proc.stdout.strip().split(";")[0]

    record = _job_record(slurm_cluster, job_id)
    if record:  # sbatch --wait's exit code 0 already says it finished with 0
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
    assert f"job {job_id}: 1 node(s) x 2 process(es), rendezvous 127.0.0.1:{exports['MASTER_PORT']}" in log
    assert f"job {job_id}: result in {result}" in log

    # The smoke job ran the real trainer on both ranks: 3 steps, a checkpoint, a resumed 4th step.
    report = json.loads(result.read_text())
    assert report["ok"] and not report["problems"] and report["backend"] == "gloo" and report["world_size"] == 2
    ranks = sorted(report["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["local_rank"] for r in ranks] == [0, 1]
    assert all(r["device"] == "cpu" and r["world_size"] == 2 for r in ranks)
    assert len(ranks[0]["losses"]) == 4 and ranks[0]["losses"] == ranks[1]["losses"]
    assert all(r["resumed_from"].endswith("step-000000003") for r in ranks)
    assert all(r["slurm_job_id"] == job_id and r["node_id"] == 0 for r in ranks)


STEPS = 60  # long enough that the signal at step 3 arrives well before the end


def test_sbatch_pretrain_script_one_node_two_cpu_ranks(slurm_cluster, tmp_path):
    """slurm/pretrain_6m.sh end to end on 2 gloo ranks: CONFIG, OVERRIDES and RUN_DIR reach the
    trainer, which writes its checkpoint and an MLflow run into the run directory. Mid-run the job
    gets SLURM's pre-timeout signal (USR1 to the batch shell): the trainer checkpoints, the job
    requeues itself, and its second start resumes and finishes the same run."""
    import yaml
    from mlflow.tracking import MlflowClient

    from tests.train_helpers import train_config, write_prep_dir

    prep = write_prep_dir(tmp_path / "prep")
    # The tiny model of the training tests; data and run_dir are placeholders that the job's
    # OVERRIDES and RUN_DIR must replace.
    tiny = train_config("", "runs/placeholder-not-used").to_dict()
    tiny["train"].update(engine="megatron", precision="fp32")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny, sort_keys=False))
    run_dir = tmp_path / "run"
    output = tmp_path / "job.out"
    exports = {
        "PYTHON": sys.executable,
        "REPO_DIR": str(REPO),
        "NPROC_PER_NODE": "2",
        "CONFIG": str(config),
        "OVERRIDES": f"train.data={prep} train.steps={STEPS} train.save_every=1000",
        "RUN_DIR": str(run_dir),
        "MASTER_PORT": str(find_free_port()),
        "MLFLOW_TRACKING_URI": f"sqlite:///{run_dir}/mlflow.db",  # a store of its own, whatever the caller's env
    }
    # sbatch's --export splits on commas only: the space-separated OVERRIDES stay one value.
    waiting = subprocess.Popen(
        ["sbatch", "--wait", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
         "--time=00:09:00", f"--output={output}", f"--chdir={REPO}",
         "--export=ALL," + ",".join(f"{k}={v}" for k, v in exports.items()),
         str(REPO / "slurm" / "pretrain_6m.sh")],
        env=slurm_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    job_id = waiting.stdout.readline().strip().split(";")[0]
    deadline = time.monotonic() + 300
    while f"step 3/{STEPS}" not in (output.read_text(errors="replace") if output.exists() else ""):
        job_output = output.read_text(errors="replace")[-4000:] if output.exists() else "(no job output)"
        assert waiting.poll() is None and time.monotonic() < deadline, \
            f"no progress:\n--- job output ---\n{job_output}\n{slurm_cluster.log_tails()}"
        time.sleep(0.5)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job_id])  # what --signal=B:USR1@300 sends
    _, stderr = waiting.communicate(timeout=600)
    log = output.read_text(errors="replace") if output.exists() else "(no job output)"
    assert waiting.returncode == 0, f"{stderr}\njob output:\n{log}\n{slurm_cluster.log_tails()}"
    stopped = re.search(r"stopped after step (\d+) \(.*STOP\); rerun the same command to resume", log)
    assert "time limit near: checkpointing, then requeueing" in log and stopped, log
    assert f"job {job_id} (start 2)" in log and f"resuming from {run_dir}/checkpoints/step-{int(stopped.group(1)):09d}" in log, log

    record = _job_record(slurm_cluster, job_id)
    if record:
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
    assert f"job {job_id} (start 1): 1 node(s) x 2 process(es), rendezvous 127.0.0.1:{exports['MASTER_PORT']}" in log
    assert f"run_dir {run_dir}, {STEPS} steps of 4 x 64 tokens" in log and "starting at step 0" in log, log
    assert f"final step {STEPS}" in log, log
    assert f"job {job_id}: training exited with 0" in log, log
    assert not (REPO / "runs" / "placeholder-not-used").exists()

    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == f"step-{STEPS:09d}"
    state = json.loads((checkpoints / f"step-{STEPS:09d}" / "train_state.json").read_text())
    assert state["step"] == STEPS and state["parallel"] == {"tensor": 1, "pipeline": 1, "data": 2}
    assert len(state["loaders"]) == 2

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    experiment = client.get_experiment_by_name("nulls-tests")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["nulls.resume_count"] == "1", "the second start continued the same MLflow run"
    assert run.data.params["train.run_dir"] == str(run_dir)
    losses = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == list(range(1, STEPS + 1))

"""Submit ``nulls prep`` (or ``nulls train`` on one node) to a Ray cluster as a Ray Job.

    python -m launch.ray_job --address http://HEAD:8265 --config configs/prep_enwiki_full.yaml \\
        [--output /data/nulls/prep] [--wait] [--module] [key=value ...]
    python -m launch.ray_job --address http://HEAD:8265 --train --config configs/demo_cpu.yaml \\
        --nproc 8 --gpus 8 [--wait] [--module] train.data=/data/nulls/prep ...

``--train`` runs ``nulls train --nproc N`` (torchrun on one machine) as the job's entrypoint; with
``--gpus G`` Ray places the entrypoint on a node with G free GPUs (``entrypoint_num_gpus``), else it
reserves ``--nproc`` CPUs. Multi-node training belongs to SLURM (slurm/pretrain_6m.sh) or torchrun.

The job's ``runtime_env.working_dir`` is this checkout (Ray zips and uploads it, leaving out .git,
.venv, out/ and caches), so the cluster runs exactly this code; the entrypoint is
``nulls prep --config <config path relative to the checkout> ...``. Inside the job ``ray.init()``
joins the cluster through ``$RAY_ADDRESS``, so the config needs no ``ray.address``. ``--module``
runs ``python -m data_prep.cli`` instead, for clusters whose Python has no ``nulls`` console script
(the uploaded checkout is the job's current directory, so the package imports from there).

Paths in the config must exist on the cluster: use absolute paths on a shared file system for the
inputs and ``output_dir`` (relative ones resolve inside the uploaded copy of the checkout). The
address is the dashboard's HTTP address (port 8265): the head needs ``ray[default]``, whose dashboard
serves the job API.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXCLUDES = [".git", ".venv", "out", "**/__pycache__", "*.egg-info", ".pytest_cache", "*.tar"]


def _relative_config(config: str, working_dir: Path) -> str:
    try:
        return Path(config).resolve().relative_to(Path(working_dir).resolve()).as_posix()
    except ValueError as err:
        raise ValueError(f"{config}: the config must lie inside the working dir {working_dir} that is uploaded") from err


def build_entrypoint(config: str, output: str | None = None, overrides: Iterable[str] = (), module: bool = False,
                     working_dir: Path = REPO_ROOT) -> str:
    """The prep job's shell command, with the config path made relative to the uploaded working dir."""
    cmd = ["python", "-m", "data_prep.cli"] if module else ["nulls", "prep"]
    cmd += ["--config", _relative_config(config, working_dir), "--no-progress"]
    if output is not None:
        cmd += ["--output", output]
    return shlex.join([*cmd, *overrides])


def build_train_entrypoint(config: str, nproc: int = 1, overrides: Iterable[str] = (), module: bool = False,
                           working_dir: Path = REPO_ROOT) -> str:
    """The training job's shell command: ``nulls train --config <rel> --nproc N --set k=v ...``."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    cmd = ["python", "-m", "nulls_megatron.cli"] if module else ["nulls"]
    cmd += ["train", "--config", _relative_config(config, working_dir), "--nproc", str(nproc)]
    for item in overrides:
        cmd += ["--set", item]
    return shlex.join(cmd)


def _submit(address: str, entrypoint: str, working_dir: Path, env_vars: dict[str, str] | None,
            pip: list[str] | None, excludes: list[str] | None, **resources) -> tuple[object, str]:
    from ray.job_submission import JobSubmissionClient

    runtime_env: dict = {"working_dir": str(working_dir), "excludes": excludes or DEFAULT_EXCLUDES}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if pip:
        runtime_env["pip"] = list(pip)
    client = JobSubmissionClient(address)
    return client, client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, **resources)


def submit_prep_job(address: str, config: str, output: str | None = None, overrides: Iterable[str] = (),
                    module: bool = False, working_dir: Path = REPO_ROOT, env_vars: dict[str, str] | None = None,
                    pip: list[str] | None = None, excludes: list[str] | None = None) -> tuple[object, str]:
    """Submit the prep job; returns (client, job id). ``pip`` installs packages into the job's environment."""
    return _submit(address, build_entrypoint(config, output, overrides, module, working_dir), working_dir,
                   env_vars, pip, excludes)


def submit_train_job(address: str, config: str, nproc: int = 1, gpus: int = 0, overrides: Iterable[str] = (),
                     module: bool = False, working_dir: Path = REPO_ROOT, env_vars: dict[str, str] | None = None,
                     pip: list[str] | None = None, excludes: list[str] | None = None) -> tuple[object, str]:
    """Submit ``nulls train --nproc N`` on one node: with ``gpus`` Ray places it on a node with that many
    free GPUs, else it reserves ``nproc`` CPUs. ``train.data`` and ``train.run_dir`` must be paths on a
    file system the node shares (absolute; relative ones land inside the uploaded checkout)."""
    resources = {"entrypoint_num_gpus": gpus} if gpus else {"entrypoint_num_cpus": nproc}
    return _submit(address, build_train_entrypoint(config, nproc, overrides, module, working_dir), working_dir,
                   env_vars, pip, excludes, **resources)


def wait_for_job(client, job_id: str, timeout_s: float = 3600.0, poll_s: float = 2.0) -> str:
    """Block until the job ends; returns its final status name (SUCCEEDED, FAILED, STOPPED)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status.value
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray job {job_id} still {status.value} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.ray_job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", required=True, help="the cluster's dashboard address, e.g. http://head:8265")
    p.add_argument("--config", required=True, help="prep (or, with --train, model) config inside this checkout")
    p.add_argument("--output", default=None, help="prep: output folder on the cluster's shared file system")
    p.add_argument("--module", action="store_true", help="run python -m data_prep.cli / nulls_megatron.cli instead of nulls")
    p.add_argument("--train", action="store_true", help="submit `nulls train` instead of `nulls prep`")
    p.add_argument("--nproc", type=int, default=1, help="train: processes on the node (torchrun)")
    p.add_argument("--gpus", type=int, default=0, help="train: GPUs the node must have free (0: a CPU job)")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its logs")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = p.parse_args(argv)
    if args.train:
        if args.output is not None:
            p.error("--output is for prep jobs; set train.run_dir=... for training")
        client, job_id = submit_train_job(args.address, args.config, args.nproc, args.gpus, args.overrides, args.module)
    else:
        client, job_id = submit_prep_job(args.address, args.config, args.output, args.overrides, args.module)
    print(f"submitted Ray job {job_id}; follow it with: ray job logs --address {args.address} --follow {job_id}")
    if not args.wait:
        return 0
    status = wait_for_job(client, job_id)
    print(client.get_job_logs(job_id))
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


if __name__ == "__main__":
    sys.exit(main())

"""`nulls train` end to end on real-text shards, 2 gloo ranks (DP=2): checkpoints, bit-identical resume,
a SIGKILL in the middle of a save, MLflow records; then TP=2 x PP=2 on 4 ranks, resumed as TP=1 x PP=4.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from launch.local import RankFailedError, run_local
from tests.train_helpers import ARTICLES, train_config, write_prep_dir

pytestmark = pytest.mark.skipif(not ARTICLES.is_file(), reason=f"{ARTICLES} is missing: these tests need its real text")
STEPS, SAVE_EVERY = 6, 3


def _cfg(data, run_dir, **sections):
    sections.setdefault("train", {}).update({"steps": STEPS, "save_every": SAVE_EVERY})
    return train_config(data, run_dir, **sections)


KILL_POINTS = ("sink_manifest", "backbone", "latest")


def killed_during_second_save(rank: int, world_size: int, data: str, run_dir: str, point: str) -> None:
    """Train; SIGKILL one rank while step 6 is saved: after every rank wrote the sink files (rank 0, before
    the manifest's rename), after one rank wrote its backbone shard (rank 1, the other waits in the save),
    or after the checkpoint's rename and before ``latest`` names it (rank 0)."""
    import nulls_megatron.train.checkpointing as checkpointing
    from nulls_megatron.train.trainer import train

    def dying(real, when, on_rank):
        def call(dir, *args, **kwargs):
            if when == "before" and rank == on_rank and "step-000000006" in str(args[0] if args else ""):
                os.kill(os.getpid(), signal.SIGKILL)
            out = real(dir, *args, **kwargs)
            if when == "after" and rank == on_rank and "step-000000006" in str(dir):
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return call

    if point == "sink_manifest":
        checkpointing.write_sink_manifest = dying(checkpointing.write_sink_manifest, "after", 0)
    elif point == "backbone":
        checkpointing.save_backbone = dying(checkpointing.save_backbone, "after", 1)
    else:  # update_latest(root, name): the checkpoint is renamed into place, the pointer not yet moved
        checkpointing.update_latest = dying(checkpointing.update_latest, "before", 0)
    train(_cfg(data, run_dir))


def _digests(checkpoint: str) -> dict:
    """The recorded sha256 of every weight, moment and sink file of a checkpoint (not its config and
    train state, which name the run directory)."""
    from nulls_megatron.checkpoint.digests import read_digests

    return {name: d["sha256"] for name, d in read_digests(Path(checkpoint)).items()
            if name.startswith(("backbone/", "sinks/"))}


def resume_worker(rank: int, world_size: int, data: str, root: str) -> dict:
    from nulls_megatron.checkpoint.atomic import read_latest
    from nulls_megatron.train.trainer import train

    full = train(_cfg(data, f"{root}/full"))
    first = train(_cfg(data, f"{root}/split"), stop_after=SAVE_EVERY)
    second = train(_cfg(data, f"{root}/split"))
    killed = {}
    for point in KILL_POINTS:
        checkpoints = f"{root}/killed-{point}/checkpoints"
        latest, entries = str(read_latest(checkpoints)), sorted(os.listdir(checkpoints))
        after = train(_cfg(data, f"{root}/killed-{point}"))
        killed[point] = {"latest": latest, "entries": entries, "after": after, "digests": _digests(after.checkpoint),
                         "remaining": sorted(os.listdir(checkpoints))}
    # keep_last: a run that keeps one checkpoint holds only its newest (and `latest`).
    kept = train(_cfg(data, f"{root}/keep1", train={"keep_last": 1}))
    kept_entries = sorted(os.listdir(f"{root}/keep1/checkpoints"))
    # Stop requests: the STOP file (SLURM's pre-timeout trap) and SIGUSR1 to one rank. Both stop every
    # rank after the same step with a checkpoint; rerunning finishes the run as if never stopped.
    # A STOP left by an earlier job (its trap fired, then it crashed) is cleared at start, not obeyed.
    Path(f"{root}/stale").mkdir(parents=True, exist_ok=True)
    if rank == 0:
        Path(f"{root}/stale/STOP").touch()
    stale = train(_cfg(data, f"{root}/stale"))
    import nulls_megatron.train.trainer as trainer

    real_lr = trainer.learning_rate

    def lr_and_stop_file(step, total, opt):  # the trap writes STOP while the run trains
        if step == 0 and rank == 0:
            Path(f"{root}/stopfile/STOP").touch()
        return real_lr(step, total, opt)

    trainer.learning_rate = lr_and_stop_file
    stopped_by_file = train(_cfg(data, f"{root}/stopfile"))
    trainer.learning_rate = real_lr
    finished_after_file = train(_cfg(data, f"{root}/stopfile"))

    def lr_and_signal(step, total, opt):
        if step == 1 and rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_lr(step, total, opt)

    trainer.learning_rate = lr_and_signal
    stopped_by_signal = train(_cfg(data, f"{root}/signal"))
    trainer.learning_rate = real_lr
    finished_after_signal = train(_cfg(data, f"{root}/signal"))
    stops = [(r.final_step, r.stopped_by, r.losses) for r in
             (stopped_by_file, finished_after_file, stopped_by_signal, finished_after_signal, stale)]
    # The DeepSpeed engine through the same checkpoints (ZeRO-2 moments gathered over DP and restored).
    zero = {"engine": "deepspeed", "zero_stage": 2, "steps": 4, "save_every": 2}
    ds_full = train(train_config(data, f"{root}/ds_full", train=dict(zero)))
    ds_first = train(train_config(data, f"{root}/ds_split", train=dict(zero)), stop_after=2)
    ds_second = train(train_config(data, f"{root}/ds_split", train=dict(zero)))
    # Megatron's distributed optimizer (the GPU default; overlapped gathers) through the trainer: a save
    # gathers the parameters the next forward would have, and a stopped and resumed run is bit-identical.
    dist_opt = {"optimizer": {"distributed": "on"}}
    do_full = train(_cfg(data, f"{root}/do_full", **dist_opt))
    do_first = train(_cfg(data, f"{root}/do_split", **dist_opt), stop_after=SAVE_EVERY)
    do_second = train(_cfg(data, f"{root}/do_split", **dist_opt))
    distributed = {"losses": (do_full.losses, do_first.losses, do_second.losses),
                   "digests": (_digests(do_full.checkpoint), _digests(do_second.checkpoint))}
    # Another data-parallel size (TP=2 on the 2 ranks: DP=1) refuses the DP=2 checkpoint: the data order is tied to it.
    try:
        train(train_config(data, f"{root}/split", parallel={"tensor_parallel": 2},
                           train={"steps": STEPS + 3, "save_every": SAVE_EVERY}))
        other_dp = None
    except ValueError as e:
        other_dp = str(e)
    return {"full": full, "first": first, "second": second, "killed": killed, "kept": (kept.losses, kept_entries),
            "digests": {name: _digests(r.checkpoint) for name, r in (("full", full), ("second", second))},
            "ds": (ds_full.losses, ds_first.losses, ds_second.losses), "stops": stops, "other_dp": other_dp,
            "distributed": distributed}


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Path:
    return write_prep_dir(tmp_path_factory.mktemp("prep"))


def test_train_resume_kill_and_tracking(prep, tmp_path):
    data = str(prep)
    for point in KILL_POINTS:
        with pytest.raises(RankFailedError, match="killed by signal 9|died|SIGKILL|signal"):
            run_local(killed_during_second_save, 2, data, str(tmp_path / f"killed-{point}"), point, timeout=300)
    rank0, rank1 = run_local(resume_worker, 2, data, str(tmp_path), timeout=600)

    full = rank0["full"]
    assert full.final_step == STEPS and full.steps_run == STEPS and full.resumed_from is None
    assert len(full.losses) == STEPS and full.losses[-1] < full.losses[0]
    assert rank1["full"].losses == full.losses, "both DP ranks report the global batch's loss"
    # Stopped after 3 steps and restarted: the same losses, bit for bit.
    first, second = rank0["first"], rank0["second"]
    assert first.final_step == SAVE_EVERY and second.resumed_from.endswith("step-000000003")
    assert first.losses + second.losses == full.losses
    # Bit-identical means the weights, the moments and the sink files too, not only the losses.
    assert rank0["digests"]["second"] == rank0["digests"]["full"] and len(rank0["digests"]["full"]) >= 6
    # Killed while saving step 6 (sink files written; one rank's backbone shard written: the survivor's
    # collective fails and removes its temp directory): `latest` still named step 3, no debris was left
    # after the rerun, which matched the uninterrupted run in losses and bytes.
    for point in ("sink_manifest", "backbone"):
        k = rank0["killed"][point]
        assert k["latest"].endswith("step-000000003"), point
        assert "step-000000006" not in k["entries"], (point, k["entries"])
        if point == "sink_manifest":  # rank 0 itself died: its temp directory stayed until the rerun
            assert any(e.startswith(".step-000000006.tmp-") for e in k["entries"]), (point, k["entries"])
        assert k["after"].resumed_from.endswith("step-000000003") and k["after"].losses == full.losses[SAVE_EVERY:], point
        assert k["remaining"] == ["latest", "step-000000003", "step-000000006"], (point, k["remaining"])
        assert k["digests"] == rank0["digests"]["full"], point
    # Killed after step 6 was renamed into place, before `latest` named it: the complete checkpoint is
    # taken (not refused as a hand-edited pointer, not trained again).
    k = rank0["killed"]["latest"]
    assert k["latest"].endswith("step-000000003") and "step-000000006" in k["entries"]
    assert k["after"].resumed_from.endswith("step-000000006") and k["after"].steps_run == 0
    assert k["digests"] == rank0["digests"]["full"]
    assert (tmp_path / "killed-latest" / "checkpoints" / "latest").read_text().strip() == "step-000000006"
    kept_losses, kept_entries = rank0["kept"]
    assert kept_losses == full.losses and kept_entries == ["latest", "step-000000006"]
    assert "saved with 2 data-parallel replicas, this run has 1" in rank0["other_dp"]

    for results in (rank0["stops"], rank1["stops"]):
        (file_step, file_reason, file_losses), (end1, none1, rest1), (sig_step, sig_reason, sig_losses), (end2, none2, rest2), \
            (stale_step, stale_reason, stale_losses) = results
        assert (stale_step, stale_reason, stale_losses) == (STEPS, None, full.losses)
        assert (file_step, end1, sig_step, end2) == (1, STEPS, 2, STEPS) and none1 is none2 is None
        assert file_reason.endswith("STOP") and sig_reason == "SIGUSR1"
        assert file_losses + rest1 == full.losses and sig_losses + rest2 == full.losses
    assert not (tmp_path / "stopfile" / "STOP").exists(), "the STOP file is consumed"
    assert not (tmp_path / "stale" / "STOP").exists(), "a stale STOP file is cleared at start"
    ds_full, ds_first, ds_second = rank0["ds"]
    assert len(ds_full) == 4 and ds_first + ds_second == ds_full, "DeepSpeed: resume is bit-identical too"
    assert ds_full[:2] == pytest.approx(full.losses[:2], abs=1e-4), "both engines train the same model the same way"

    do_full, do_first, do_second = rank0["distributed"]["losses"]
    assert do_first + do_second == do_full and do_full == rank1["distributed"]["losses"][0]
    assert do_full == pytest.approx(full.losses, abs=1e-5), "the distributed optimizer trains as the replicated one"
    do_digests, do_resumed_digests = rank0["distributed"]["digests"]
    assert do_resumed_digests == do_digests and set(do_digests) == set(rank0["digests"]["full"])

    # The checkpoint layout.
    step6 = tmp_path / "full" / "checkpoints" / "step-000000006"
    assert (tmp_path / "full" / "checkpoints" / "latest").read_text().strip() == "step-000000006"
    state = json.loads((step6 / "train_state.json").read_text())
    assert state["step"] == STEPS and state["optimizer_steps"] == STEPS and state["parallel"]["data"] == 2
    assert [s["dp_rank"] for s in state["loaders"]] == [0, 1]
    sinks = json.loads((step6 / "sinks" / "manifest.json").read_text())
    assert sinks["layers"] == [0, 1] and sinks["optimizer_tensors"] == ["exp_avg", "exp_avg_sq"]
    assert len(sinks["files"]) == 4  # 2 layers x 2 pool shards
    assert (step6 / "backbone").is_dir() and (step6 / "config.yaml").is_file()

    # MLflow: the run, with params, metrics, tags.
    from mlflow.tracking import MlflowClient

    # The run directory names its run in the one store every run of the session shares.
    state = json.loads((tmp_path / "full" / "mlflow_run.json").read_text())
    assert not (tmp_path / "full" / "mlflow.db").exists()
    client = MlflowClient(tracking_uri=state["tracking_uri"])
    run = client.get_run(full.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.hidden_size"] == "64" and run.data.params["train.engine"] == "megatron"
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "sink/live_sinks", "sink/sources", "sink/tokens_shard_000"):
        history = client.get_metric_history(full.run_id, key)
        assert [m.step for m in history] == list(range(1, STEPS + 1)), key
    uploaded = {a.path for a in client.list_artifacts(full.run_id, "checkpoints/step-000000006")}
    assert uploaded == {f"checkpoints/step-000000006/{n}" for n in ("manifest.json", "nulls_backbone.json", "train_state.json")}
    losses = [m.value for m in client.get_metric_history(full.run_id, "loss")]
    assert losses == pytest.approx(full.losses, rel=1e-6)
    live = [m.value for m in client.get_metric_history(full.run_id, "sink/live_sinks")]
    assert all(12 <= v <= 192 for v in live), live  # at least one source's k=12 sinks, at most the pool


def reshard_worker(rank: int, world_size: int, data: str, root: str) -> dict:
    from nulls_megatron.train.trainer import train

    layout = {"model": {"num_layers": 4}, "parallel": {"tensor_parallel": 2, "pipeline_parallel": 2}}
    steps = {"steps": 4, "save_every": 2}
    whole = train(train_config(data, f"{root}/tp2pp2", train=dict(steps), **layout))
    half = train(train_config(data, f"{root}/switch", train=dict(steps), **layout), stop_after=2)
    # The same run continued as TP=1 x PP=4: the backbone checkpoint reshards.
    rest = train(train_config(data, f"{root}/switch", train=dict(steps), model={"num_layers": 4},
                              parallel={"tensor_parallel": 1, "pipeline_parallel": 4}))
    return {"whole": whole.losses, "half": half.losses, "rest": rest.losses, "resumed": rest.resumed_from}


def test_tensor_and_pipeline_parallel_on_4_ranks_resumed_in_another_layout(prep, tmp_path):
    results = run_local(reshard_worker, 4, str(prep), str(tmp_path), timeout=600)
    last = results[3]  # the last pipeline stage in both layouts
    assert all(r["whole"] == last["whole"] for r in results), "every rank reports the last stage's loss"
    assert last["resumed"].endswith("step-000000002")
    assert len(last["whole"]) == 4 and last["whole"][-1] < last["whole"][0]
    assert last["half"] == last["whole"][:2]
    # Another TP/PP split changes the order of floating-point sums, not the math.
    assert last["rest"] == pytest.approx(last["whole"][2:], abs=2e-5)


def test_nulls_train_command_with_two_processes(prep, tmp_path, monkeypatch, capsys):
    """The user-facing command: `nulls train --config x.yaml --nproc 2 --set ...` (torchrun underneath)."""
    import subprocess
    import sys

    import yaml

    cfg = train_config(prep, tmp_path / "run", train={"steps": 2, "save_every": 0})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    nulls = Path(sys.executable).with_name("nulls")
    out = subprocess.run([str(nulls), "train", "--config", str(config), "--nproc", "2", "--set", "train.log_every=1",
                          "--set", "tracking.enabled=false"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 2/2 (100.0%) | loss " in out.stdout and " tok/s | elapsed " in out.stdout and "ETA" in out.stdout
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-000000002"
    assert not (tmp_path / "run" / "mlflow.db").exists(), "tracking.enabled=false writes no MLflow store"
    # Rerun: finished, said before any process is launched (torchrun would replace this one by execv).
    from nulls_megatron import cli

    def no_launch(*argv):
        raise AssertionError(f"a finished run launched processes: {argv}")

    monkeypatch.setattr(os, "execv", no_launch)
    assert cli.main(["train", "--config", str(config), "--nproc", "2", "--set", "tracking.enabled=false"]) == 0
    assert f"run already finished: step 2 of 2, checkpoint {tmp_path / 'run' / 'checkpoints' / 'step-000000002'}" \
        in capsys.readouterr().out
    bad = subprocess.run([str(nulls), "train", "--config", str(config), "--set", "train.global_batch_rows=3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.global_batch_rows" in bad.stderr and "tiny.yaml" in bad.stderr


def test_a_run_is_finished_only_when_latest_has_reached_its_steps(tmp_path):
    from nulls_megatron.checkpoint.train_state import TRAIN_STATE_FORMAT, finished_checkpoint, finished_message

    root = tmp_path / "checkpoints"
    assert finished_checkpoint(root, 4) is None, "no run yet"
    step = root / "step-000000004"
    step.mkdir(parents=True)
    (root / "latest").write_text("step-000000004\n")
    assert finished_checkpoint(root, 4) is None, "no train state: the trainer reports the damage"
    (step / "train_state.json").write_text(json.dumps({"format": TRAIN_STATE_FORMAT, "step": 4, "loss": 2.5}))
    assert finished_checkpoint(root, 5) is None, "more steps to go"
    checkpoint, state = finished_checkpoint(root, 4)
    assert checkpoint == step and finished_message(checkpoint, state, 4) == (
        f"run already finished: step 4 of 4, checkpoint {step}, last loss 2.5000 (raise train.steps to train further)")
    (root / "step-000000004-unlearn-001").mkdir()
    assert finished_checkpoint(root, 4) is None, "a version newer than latest: the trainer decides"
    (root / "step-000000004-unlearn-001").rmdir()
    (root / "latest").write_text("step-000000009\n")
    assert finished_checkpoint(root, 4) is None, "latest names a missing checkpoint: the trainer refuses it"

"""Checkpoints you can trust (issue 9), with real damage and real kills: bytes overwritten, a bit flipped, a
file truncated, `latest` deleted or garbled, roll back by hand, a finished rerun, a NaN, byte-identical
saves, and no writer process outliving a SIGKILLed trainer. One launch of one rank runs the training cases."""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from launch.local import RankFailedError, run_local
from tests.train_helpers import train_config, write_prep_dir

STEPS = 6


def _cfg(data: str, run_dir: str, **train):
    return train_config(data, run_dir, train={"steps": STEPS, "save_every": 3, "keep_last": 5, **train},
                        tracking={"enabled": False})


def _attempt(fn, *args, **kwargs) -> tuple[str | None, object]:
    """(error type and message, result) of a call that may be refused."""
    try:
        return None, fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the test asserts on the type and message
        return f"{type(e).__name__}: {e}", None


def trust_worker(rank: int, world_size: int, data: str, root: str) -> dict:
    import torch

    import nulls_megatron.train.trainer as trainer
    from nulls_megatron.checkpoint.atomic import read_latest
    from nulls_megatron.train.trainer import train

    out: dict = {}
    base = f"{root}/base"
    out["full"] = train(_cfg(data, base)).losses
    ckpts = Path(base) / "checkpoints"

    def fresh(name: str) -> Path:
        shutil.copytree(base, f"{root}/{name}")
        return Path(root) / name / "checkpoints"

    # The same run again from scratch, in the same place (paths are recorded in the files): byte-identical
    # files at every step, shown by the digests.
    os.replace(base, f"{root}/first")
    out["again"] = train(_cfg(data, base)).losses
    out["same_bytes"] = {step: json.loads((ckpts / step / "digests.json").read_text())["files"]
                         == json.loads((Path(root) / "first" / "checkpoints" / step / "digests.json").read_text())["files"]
                         for step in ("step-000000003", "step-000000006")}
    # Damage to the newest checkpoint's backbone: refused before anything is loaded or saved.
    for case in ("overwrite", "bitflip", "truncate"):
        c = fresh(case)
        shard = next((c / "step-000000006" / "backbone").glob("*.distcp"))
        data_bytes = bytearray(shard.read_bytes())
        if case == "overwrite":
            data_bytes[len(data_bytes) // 2:len(data_bytes) // 2 + 256] = b"\xff" * 256
        elif case == "bitflip":
            data_bytes[len(data_bytes) // 3] ^= 0x10
        else:
            data_bytes = data_bytes[: len(data_bytes) // 2]
        shard.write_bytes(bytes(data_bytes))
        error, _ = _attempt(train, _cfg(data, str(c.parent), steps=9))
        out[case] = {"error": error, "entries": sorted(p.name for p in c.iterdir())}
        if case == "overwrite":  # the sanctioned way back: roll back to the step the error names
            rolled = train(_cfg(data, str(c.parent)), resume_from="3")
            out["rolled"] = {"losses": rolled.losses, "entries": sorted(p.name for p in c.iterdir()),
                             "aside": sorted(p.name for d in c.glob("rolled-back-*") for p in d.iterdir()),
                             "latest": read_latest(c).name}
    # `latest` deleted, or garbage: refused naming the file, never a silent restart from step 0.
    c = fresh("no_latest")
    (c / "latest").unlink()
    out["no_latest"] = _attempt(train, _cfg(data, str(c.parent)))[0]
    c = fresh("older_latest")  # the natural fix by hand: point `latest` at an older checkpoint
    (c / "latest").write_text("step-000000003\n")
    out["older_latest"] = _attempt(train, _cfg(data, str(c.parent), steps=9))[0]
    c = fresh("garbage_latest")
    (c / "latest").write_bytes(b"\xff\xfe\x00garbage")
    out["garbage_latest"] = _attempt(train, _cfg(data, str(c.parent)))[0]
    # A finished run rerun: says so and exits cleanly.
    finished = train(_cfg(data, base))
    out["finished"] = {"steps_run": finished.steps_run, "final_step": finished.final_step, "last_loss": finished.last_loss}
    # A NaN in the weights: the step stops before the optimizer step and before any save.
    c = fresh("nan")
    real_build = trainer.build_model_and_engine

    poison_at = [7]  # the second step after resuming at 6

    def poisoned(cfg, n_micro):
        engine = real_build(cfg, n_micro)
        original = engine.train_step

        def step_with_nan(batches, lr):
            if engine.optimizer_steps() == poison_at[0]:
                with torch.no_grad():
                    next(p for n, p in engine.module.named_parameters() if "linear_qkv" in n).view(-1)[0] = float("nan")
            return original(batches, lr)

        engine.train_step = step_with_nan
        return engine

    trainer.build_model_and_engine = poisoned
    try:
        out["nan"] = _attempt(train, _cfg(data, str(c.parent), steps=12, save_every=1))[0]
        out["nan_entries"] = sorted(p.name for p in c.iterdir())
        poison_at[0] = 1  # DeepSpeed, from scratch: its second step
        out["nan_deepspeed"] = _attempt(train, _cfg(data, f"{root}/nan_ds", steps=4, save_every=1, engine="deepspeed"))[0]
        out["nan_deepspeed_entries"] = sorted(p.name for p in (Path(root) / "nan_ds" / "checkpoints").iterdir())
    finally:
        trainer.build_model_and_engine = real_build
    return out


@pytest.fixture(scope="module")
def trust(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("trust")
    data = write_prep_dir(base / "data")
    out = run_local(trust_worker, 1, str(data), str(base / "runs"), timeout=600)[0]
    return {**out, "root": base / "runs"}


def test_checkpoint_list_and_verify_commands(trust, capsys):
    from nulls_megatron.cli import main

    assert main(["checkpoint", "list", str(trust["root"] / "base")]) == 0
    listing = capsys.readouterr().out
    assert "step-000000003" in listing and "verified" in listing and "<- latest" in listing
    damaged = trust["root"] / "bitflip" / "checkpoints"
    assert main(["checkpoint", "list", str(damaged)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    assert main(["checkpoint", "verify", str(damaged / "step-000000006")]) == 1
    assert "__0_0.distcp: sha256" in capsys.readouterr().out
    assert main(["checkpoint", "verify", str(damaged / "step-000000003")]) == 0
    assert "OK" in capsys.readouterr().out


def test_same_state_saved_twice_gives_the_same_bytes(trust):
    assert trust["full"] == trust["again"]
    assert trust["same_bytes"] == {"step-000000003": True, "step-000000006": True}


@pytest.mark.parametrize("case", ["overwrite", "bitflip", "truncate"])
def test_damaged_backbone_is_refused_naming_file_digest_and_the_good_checkpoint(trust, case):
    error, entries = trust[case]["error"], trust[case]["entries"]
    assert error and error.startswith("CheckpointCorruptError"), error
    assert "step-000000006/backbone/__0_0.distcp" in error and "nothing was loaded" in error
    assert ("bytes" in error) if case == "truncate" else ("expected" in error and "sha256" in error)
    assert "nearest checkpoint that verifies is step-000000003" in error and "--resume-from step-000000003" in error
    assert entries == ["latest", "step-000000003", "step-000000006"]  # nothing saved, nothing pruned


def test_roll_back_moves_newer_checkpoints_aside_and_resumes_bit_exactly(trust):
    rolled = trust["rolled"]
    assert rolled["losses"] == trust["full"][3:]
    assert rolled["aside"] == ["step-000000006"] and rolled["latest"] == "step-000000006"
    assert [e for e in rolled["entries"] if e.startswith("step-")] == ["step-000000003", "step-000000006"]


def test_missing_or_garbled_latest_is_refused(trust):
    assert "no 'latest' pointer" in trust["no_latest"] and "--resume-from 6" in trust["no_latest"]
    assert "latest: not a checkpoint name" in trust["garbage_latest"]
    assert "newer checkpoints exist (step-000000006)" in trust["older_latest"]
    assert "--resume-from step-000000003" in trust["older_latest"]


def test_finished_run_says_so(trust):
    assert trust["finished"] == {"steps_run": 0, "final_step": STEPS, "last_loss": trust["full"][-1]}


def test_non_finite_gradient_stops_before_the_step_and_the_save(trust):
    error = trust["nan"]
    assert error.startswith("NonFiniteError: step 8:") and "rank 0" in error and "the step was not taken" in error
    assert "first non-finite gradient: " in error and "on another rank" not in error
    # Step 7 was saved (save_every=1); the NaN step 8 was not, and nothing was pruned.
    assert [e for e in trust["nan_entries"] if e.startswith("step-")] == ["step-000000003", "step-000000006", "step-000000007"]
    ds = trust["nan_deepspeed"]
    assert ds.startswith("NonFiniteError: step 2:") and "first non-finite parameter: " in ds and "linear_qkv" in ds, ds
    assert [e for e in trust["nan_deepspeed_entries"] if e.startswith("step-")] == ["step-000000001"]


def killed_while_writers_run(rank: int, world_size: int, data: str, run_dir: str, pid_file: str) -> None:
    """Train; during the step-3 save, once Megatron's forked writer has started (it records its pid and
    sleeps), SIGKILL this trainer."""
    import threading

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from nulls_megatron.train.trainer import train

    real = filesystem_async.FileSystemWriterAsync.__dict__["write_preloaded_data"].__func__

    def slow_writer(*args, **kwargs):
        Path(pid_file).write_text(str(os.getpid()))
        time.sleep(60)
        return real(*args, **kwargs)

    filesystem_async.FileSystemWriterAsync.write_preloaded_data = staticmethod(slow_writer)

    def watchdog():
        while not Path(pid_file).exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watchdog, daemon=True).start()
    train(_cfg(data, run_dir))


def test_no_writer_process_outlives_a_killed_trainer(tmp_path):
    data = write_prep_dir(tmp_path / "data", documents=12)
    pid_file = tmp_path / "writer.pid"
    with pytest.raises(RankFailedError):
        run_local(killed_while_writers_run, 1, str(data), str(tmp_path / "run"), str(pid_file), timeout=300)
    writer = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{writer}/status").read_text()
        except FileNotFoundError:
            break
        if "\nState:\tZ" in state:  # dead, waiting to be reaped by init
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"checkpoint writer {writer} still runs 5 s after its trainer was killed")

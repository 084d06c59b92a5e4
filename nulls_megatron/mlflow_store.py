"""Where MLflow runs are stored: the default store (one sqlite file in the working directory, or
``MLFLOW_TRACKING_URI``), the lock that serialises opening a new local store, where experiments keep
their artifacts, and the reachability probe of a tracking server. Used by training's tracker and by
``nulls eval``'s report, so it imports neither."""
from __future__ import annotations

import contextlib
import fcntl
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


class TrackingError(RuntimeError):
    """Tracking cannot start (unreachable server, missing artifact, bad run state) or got bad input."""


STORE_NAME = "mlflow.db"


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else MLflow's convention: one sqlite store in the working
    directory (``./mlflow.db``) for every run started there, so that one ``mlflow ui`` shows and
    compares them all (NULLs, oracle, baselines, evaluations)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(STORE_NAME).resolve()}"


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise starting runs in one local sqlite store: processes that open a new store at once race
    in its schema migration (~7 s) and in creating an experiment. A lock file beside the store; a no-op
    for any other store (a server or a database serialises itself)."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local sqlite store (MLflow's default is
    ./mlruns in the working directory, wherever the store is); the server's choice otherwise."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created concurrently by another run
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def probe_server(uri: str, timeout_s: float) -> None:
    """Any HTTP answer (even 401/404) means reachable; MLflow's own client would retry for minutes."""
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
    try:
        urllib.request.urlopen(url, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TrackingError(f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable: {reason} "
                            f"(waited at most {timeout_s:g} s). Start the server, fix or unset MLFLOW_TRACKING_URI "
                            f"(unset: the sqlite store ./mlflow.db in the working directory), or set tracking on_unavailable=warn "
                            f"to train without tracking.") from e

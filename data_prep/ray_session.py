"""The Ray session of a prep run: join a cluster (``ray.address`` or $RAY_ADDRESS, as inside a Ray job)
or start a local Ray that listens on the loopback address only, retried on a busy machine."""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import warnings
from typing import Iterator

import ray

from data_prep.config import RayConfig

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """While Ray starts, make its node address the loopback one, so every Ray server binds to it.

    Ray 2.60 binds its servers (GCS, raylet, workers, agents) to the node address when that is the
    loopback address and to every interface (``::``) otherwise, and ``ray.init(_node_ip_address=
    "127.0.0.1")`` alone does not help: ``resolve_ip_for_localhost`` turns it into the LAN address on
    Linux. Only with Ray's ``ENABLE_RAY_CLUSTER`` switch off (its documented environment variable
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the setting macOS and Windows run with) is the node
    address 127.0.0.1. The variable is read when Ray is imported, so the module constant is set too;
    the started processes inherit the variable. Both are restored afterwards, so a later ray.init
    of a cluster in this process is not affected."""
    from ray._private import ray_constants

    name = getattr(ray_constants, "ENABLE_RAY_CLUSTERS_ENV_VAR", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    saved_env, saved_flag = os.environ.get(name), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[name] = "0"
    if saved_flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


class _TokenAuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Token authentication is enabled" not in record.getMessage()


@contextlib.contextmanager
def _quiet_token_auth_notice() -> Iterator[None]:
    """Ray turns token authentication on for a new local cluster (kept: it is the safe default) and
    says so as a warning on every start; a laptop's `nulls prep` need not greet its user with it.
    Other warnings of that logger (e.g. authentication *disabled*) still show."""
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    notice = _TokenAuthNotice()
    log.addFilter(notice)
    try:
        yield
    finally:
        log.removeFilter(notice)


LOCAL_RAY_ATTEMPTS = 3


def _start_local_ray(num_cpus: int, attempts: int = LOCAL_RAY_ATTEMPTS) -> None:
    """A fresh local Ray on 127.0.0.1. Ray gives its raylet a fixed 30 s to register, which a 2-core
    machine busy with a training can miss: that start is retried (Ray's processes shut down first)."""
    for attempt in range(1, attempts + 1):
        try:
            # "local" always starts a fresh instance: plain ray.init() would join whatever cluster
            # /tmp/ray/ray_current_cluster names, even a dead one from an earlier `ray start`.
            with _loopback_node(), _quiet_token_auth_notice():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK)
            return
        except Exception as err:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(err) or attempt == attempts:
                raise
            ray.shutdown()
            warnings.warn(f"the local Ray did not start in time (attempt {attempt} of {attempts}, a busy machine?); "
                          "retrying", RuntimeWarning, stacklevel=2)


def _is_loopback(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # "::ffff:127.0.0.1", as dual-stack sockets report it
    return (mapped or ip).is_loopback


def connect_ray(rc: RayConfig) -> bool:
    """Join the session already open in this process, the cluster at ``rc.address`` (or $RAY_ADDRESS,
    as set inside a Ray job), or start a local Ray listening on 127.0.0.1 only (a laptop run must not
    expose Ray's unauthenticated ports to the network). Returns whether this call started it."""
    if ray.is_initialized():
        return False
    address = rc.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        _start_local_ray(rc.num_cpus)
        node_ip = ray.util.get_node_ip_address()
        if not _is_loopback(node_ip):  # a Ray release that resolves the address differently
            warnings.warn(f"the local Ray started for nulls prep has node address {node_ip}, not {LOOPBACK}: "
                          "its ports may be reachable from the network", RuntimeWarning, stacklevel=2)
    return True

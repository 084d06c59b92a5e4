"""A real single-node SLURM cluster for tests: munged + slurmctld + slurmd on
127.0.0.1, configured in a private directory (``SLURM_CONF`` points there).

Use the ``slurm_cluster`` fixture (module scope)::

    from tests.slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)

    def test_x(slurm_cluster):
        slurm_cluster.run(["sbatch", "--wait", "job.sh"])

Debian's ``slurm-wlm`` and ``munge`` are installed with apt when missing (as
root, or with password-less sudo); when that is impossible or fails the tests
are skipped with the reason, or fail if ``NULLS_REQUIRE_SLURM=1``.

Each cluster lives in ``$TMPDIR/nulls-slurm-<uid>/<random>/`` (short: munge's
socket path must fit in 108 bytes) with an ``owner.pid``.  Daemons get
``PR_SET_PDEATHSIG`` so they die with the test process, and carry the marker
variable ``NULLS_SLURM_TEST_ROOT=<dir>``; a cluster whose owner is gone (a
crashed run) is cleaned up at the next start by killing exactly the processes
carrying its marker.  Ports are picked free for every start.
"""

from __future__ import annotations

import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

from launch.env import find_free_port

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sinfo", "sbatch", "scontrol", "srun")
MARKER = "NULLS_SLURM_TEST_ROOT"
PARTITION = "debug"
_START_TIMEOUT_S = 45.0


def _apt_install() -> Optional[str]:
    """Install the packages; return None on success, else why not."""
    if os.geteuid() == 0:
        prefix: List[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        prefix = ["sudo", "-n"]
    else:
        return "not root and no password-less sudo to apt-get install " + " ".join(PACKAGES)
    if not shutil.which("apt-get"):
        return "no apt-get on this machine to install " + " ".join(PACKAGES)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        proc = subprocess.run(prefix + cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-1500:]
            return f"`{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}"
    return None


def ensure_slurm_installed() -> Optional[str]:
    """None when every SLURM/munge binary is on PATH (installing if needed),
    else the reason they are not."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin" + os.pathsep + "/sbin"
    missing = [b for b in BINARIES if not shutil.which(b, path=path)]
    if not missing:
        return None
    why = _apt_install()
    if why is None:
        missing = [b for b in BINARIES if not shutil.which(b, path=path)]
        why = f"still missing after apt-get install: {missing}" if missing else None
    return why


def _set_pdeathsig() -> None:
    # prctl(PR_SET_PDEATHSIG, SIGTERM): the daemon dies with the test process,
    # even if that is SIGKILLed.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _marked_pids(root: Path) -> List[int]:
    """Processes whose environment carries this cluster's marker."""
    needle = f"{MARKER}={root}".encode() + b"\0"
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes() + b"\0"
        except OSError:  # gone, or not ours
            continue
        if needle in environ:
            pids.append(int(entry.name))
    return pids


def _kill_pids(pids: Sequence[int], grace_s: float = 5.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _parent_dir() -> Path:
    parent = Path(tempfile.gettempdir()) / f"nulls-slurm-{os.getuid()}"
    parent.mkdir(mode=0o700, exist_ok=True)
    return parent


def clean_stale_clusters() -> None:
    """Kill the daemons of and remove every cluster whose owner process is gone."""
    for root in _parent_dir().iterdir():
        try:
            owner = int((root / "owner.pid").read_text())
        except (OSError, ValueError):
            owner = -1
        if owner > 0 and _pid_alive(owner):
            continue  # a live test session (maybe another one) owns it
        _kill_pids(_marked_pids(root))
        shutil.rmtree(root, ignore_errors=True)


def _slurm_conf(root: Path, host: str, ctld_port: int, slurmd_port: int, user: str) -> str:
    mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    real_memory = max(256, min(1024, mem_mb // 2))
    # config_overrides: trust this file over the hardware slurmd detects, so the
    # node is not drained on machines with fewer CPUs than CPUs=2.
    # MinJobAge=5: `sbatch --wait` multiplies its poll interval by 4 (2, 8, 32 s)
    # while it is below MinJobAge/2, which at the default 300 wastes ~30 s per
    # job; at 5 it polls every 2 s, and finished jobs stay >= 5 s in scontrol.
    # cred_expire (default 120 s) is also how long a requeued job waits before it
    # may start again; 10 s keeps the requeue test short.
    return f"""\
ClusterName=nullstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
EnforcePartLimits=ALL
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
KillWait=5
MinJobAge=5
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory={real_memory} State=UNKNOWN
PartitionName={PARTITION} Nodes={host} Default=YES MaxTime=00:10:00 State=UP
"""


@dataclass
class SlurmCluster:
    """A running cluster; ``env`` is the environment for SLURM commands."""

    root: Path
    conf: Path
    node: str
    partition: str
    env: Dict[str, str]
    daemons: Dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, args: Sequence[str], timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a command with ``SLURM_CONF`` set; on failure raise with its
        output and the daemons' log tails."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                f"stderr:\n{proc.stderr}\n{self.log_tails()}"
            )
        return proc

    def log_tails(self, chars: int = 2000) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def node_state(self) -> str:
        proc = self.run(["sinfo", "-h", "-n", self.node, "-o", "%t"], check=False, timeout=15)
        return proc.stdout.strip() if proc.returncode == 0 else f"sinfo failed: {proc.stderr.strip()}"


def _spawn(cluster: SlurmCluster, name: str, args: List[str]) -> None:
    log = open(cluster.root / "log" / f"{name}.out", "wb")
    cluster.daemons[name] = subprocess.Popen(
        args, env=cluster.env, stdout=log, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, preexec_fn=_set_pdeathsig,
    )
    log.close()


def _wait_for(cluster: SlurmCluster, what: str, ready, timeout: float = _START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name, proc in cluster.daemons.items():
            if proc.poll() is not None:
                out = (cluster.root / "log" / f"{name}.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}:\n{out}\n{cluster.log_tails()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.log_tails()}")
        time.sleep(0.2)


def start_cluster() -> SlurmCluster:
    """Start munged, slurmctld and slurmd; return once the node is idle."""
    clean_stale_clusters()
    root = Path(tempfile.mkdtemp(prefix="c", dir=_parent_dir()))
    (root / "owner.pid").write_text(str(os.getpid()))
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    (root / "plugstack.conf").write_text("")  # no host SPANK plugins
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)

    host = socket.gethostname().split(".")[0]
    ctld_port = find_free_port()
    slurmd_port = find_free_port()
    while slurmd_port == ctld_port:
        slurmd_port = find_free_port()
    user = pwd.getpwuid(os.getuid()).pw_name
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, ctld_port, slurmd_port, user))
    env = dict(os.environ, SLURM_CONF=str(conf), **{MARKER: str(root)})
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    cluster = SlurmCluster(root, conf, host, PARTITION, env)
    try:
        _spawn(cluster, "munged", [
            "munged", "-F", "--force", f"--socket={root}/munge.socket", f"--key-file={key}",
            f"--pid-file={root}/munged.pid", f"--log-file={root}/log/munged.log",
            f"--seed-file={root}/munged.seed",
        ])
        _wait_for(cluster, "munged's socket", lambda: (root / "munge.socket").exists())
        _spawn(cluster, "slurmctld", ["slurmctld", "-D", "-c"])
        _wait_for(cluster, "slurmctld", lambda: cluster.run(["scontrol", "ping"], check=False, timeout=15).returncode == 0)
        _spawn(cluster, "slurmd", ["slurmd", "-D", "-N", host])
        _wait_for(cluster, f"node {host} idle in sinfo", lambda: cluster.node_state() == "idle")
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel the cluster's jobs, kill its daemons, remove its directory."""
    if cluster.daemons.get("slurmctld") and cluster.daemons["slurmctld"].poll() is None:
        cluster.run(["scancel", "--partition", cluster.partition], check=False, timeout=15)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            q = cluster.run(["squeue", "-h", "-o", "%i"], check=False, timeout=15)
            if q.returncode != 0 or not q.stdout.strip():
                break
            time.sleep(0.2)
    for name in ("slurmd", "slurmctld", "munged"):
        proc = cluster.daemons.get(name)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    _kill_pids(_marked_pids(cluster.root))  # slurmstepd and anything else left
    shutil.rmtree(cluster.root, ignore_errors=True)


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A running single-node cluster for the tests of one module."""
    why = ensure_slurm_installed()
    if why is not None:
        if os.environ.get("NULLS_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM is required (NULLS_REQUIRE_SLURM=1) but unavailable: {why}")
        pytest.skip(f"no local SLURM cluster: {why}")
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        stop_cluster(cluster)

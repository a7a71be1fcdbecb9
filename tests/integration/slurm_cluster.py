"""A real one-node SLURM cluster on localhost for tests, started and stopped by pid.

    from slurm_cluster import slurm_cluster      # pytest fixture (module scope); tests/integration is on sys.path

    def test_job(slurm_cluster):
        job = slurm_cluster.sbatch(script_path)  # any job script: a toy loop today, `atpo train` tomorrow
        slurm_cluster.wait_for(job, "RUNNING")
        slurm_cluster.signal_batch(job, "USR1")
        slurm_cluster.wait_until_finished(job)

Needs Debian's ``slurm-wlm slurmctld slurmd munge slurm-client`` (22.05) and root (slurmd runs jobs
as their owner). Without them the fixture skips with the reason. Everything lives in a fresh
folder under /tmp (readable by the munge user): its own munge key and socket, slurm.conf with
free ports, ``AccountingStorageType=accounting_storage/none`` (no slurmdbd/MariaDB: ``sacct`` does
not work, ``scontrol show job`` does, for ``MinJobAge`` seconds after a job ends). slurmctld and
slurmd run in the foreground as children of this process; munged is started through runuser and
stopped with ``munged --stop``. Only those processes are stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

BINARIES = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "scontrol", "scancel", "sinfo", "runuser")

SLURM_CONF = """\
# One-node SLURM 22.05 cluster on localhost for tests (no cgroups, no accounting).
ClusterName=atpotest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~30 s instead of ~150 s.
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=600
KillWait=10
Waittime=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def unavailable_reason() -> str | None:
    """Why a local cluster cannot start here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
    if missing:
        return (f"SLURM is not installed (missing {', '.join(missing)}); install with `apt-get install -y "
                f"--no-install-recommends slurm-wlm slurmctld slurmd munge slurm-client`")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as their owner)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    return max(1024, total_kb // 1024 - 1024)


class SlurmCluster:
    """A controller and one node daemon on localhost, all state under ``root``."""

    def __init__(self, root: str | Path | None = None, cpus: int | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="atpo_slurm_", dir="/tmp"))
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._procs: dict[str, subprocess.Popen] = {}
        self._munge_started = False

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged runs as the munge user and must reach its folder
        self.conf.write_text(SLURM_CONF.format(root=self.root, ctld_port=_free_port(), slurmd_port=_free_port(),
                                               cpus=self.cpus, memory_mb=_memory_mb()))
        self._start_munge()
        log = self.root / "log"
        self._procs["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-c", "-f", str(self.conf)], env=self.env,
            stdout=open(log / "slurmctld.out", "w"), stderr=subprocess.STDOUT)
        self._procs["slurmd"] = subprocess.Popen(
            ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)], env=self.env,
            stdout=open(log / "slurmd.out", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")
            state = self.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state == "idle":
                return self
            time.sleep(0.25)
        raise RuntimeError(f"the node did not become idle in {timeout:.0f} s (sinfo: {state!r}):\n"
                           f"{self.logs('slurmctld')}\n{self.logs('slurmd')}")

    def _start_munge(self) -> None:
        m = self.root / "munge"
        shutil.chown(m, "munge", "munge")
        key = m / "munge.key"
        if not key.exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create", f"--keyfile={key}"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={m}/munge.socket.2",
                        f"--key-file={key}", f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                        f"--seed-file={m}/munged.seed"], check=True)
        self._munge_started = True

    def stop(self) -> None:
        """Cancel every job, stop slurmctld/slurmd (shutdown, then by pid), stop our munged."""
        if self._procs:
            self.run("scancel", "--state=PENDING,RUNNING,SUSPENDED,REQUEUED", "--full", check=False)
            self.run("scontrol", "shutdown", check=False)
        for name, proc in self._procs.items():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        if self._munge_started:
            sock = self.root / "munge" / "munge.socket.2"
            subprocess.run(["munged", "--stop", f"--socket={sock}"], capture_output=True)
            self._munge_started = False

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ clients
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, script: str | Path, *args: str, options: tuple[str, ...] = ()) -> str:
        """Submit a job script (path) with sbatch ``options`` and script ``args``; return its id."""
        out = self.run("sbatch", "--parsable", *options, str(script), *args).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, RunTime, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait_for(self, job_id: str, *states: str, timeout: float = 120.0, predicate=None) -> str:
        """Wait until the job is in one of ``states`` (and ``predicate()`` holds, if given)."""
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states and (predicate is None or predicate()):
                return state
            if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and state not in states:
                raise RuntimeError(f"job {job_id} ended {state}: {self.job(job_id)}")
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f} s (wanted {states})")

    def wait_until_finished(self, job_id: str, timeout: float = 300.0) -> str:
        return self.wait_for(job_id, "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", timeout=timeout)

    def signal_batch(self, job_id: str, sig: str = "USR1") -> None:
        """Send ``sig`` to the batch shell only (what ``--signal=B:<sig>@T`` does at T)."""
        self.run("scancel", f"--signal={sig}", "--batch", job_id)

    def logs(self, name: str) -> str:
        parts = []
        for p in (self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.out"):
            if p.exists():
                parts.append(p.read_text()[-4000:])
        return "\n".join(parts)


@pytest.fixture(scope="module")
def slurm_cluster():
    """A started local cluster for the tests of one module; stopped (by pid) afterwards."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster()
    try:
        cluster.start()
    except Exception:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)

"""A throwaway one-node SLURM cluster on loopback, for tests: munged, slurmctld and slurmd in a temp dir.

Debian's ``slurm-wlm`` and ``munge`` packages (``.ci/run`` installs them). Everything the daemons
write (state, spool, logs, pid files, the munge socket) lives under one folder; clients find the
cluster through ``SLURM_CONF``. No accounting daemon: ``sacct`` answers "accounting storage is
disabled", so task states come from ``squeue``. Run as root, as CI does.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
SYSTEM_MUNGE_KEY = Path("/etc/munge/munge.key")
PARTITION = "debug"
NODE = "mbu-node"


def _sbin(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing() -> str | None:
    """Why no cluster can be started here, or None."""
    absent = [name for name in (*DAEMONS, "sbatch", "squeue", "scontrol", "srun") if _sbin(name) is None]
    if absent:
        return f"SLURM is not installed ({', '.join(absent)} missing; apt-get install slurm-wlm munge)"
    if importlib.util.find_spec("submitit") is None:
        return 'submitit is not installed (pip install -e ".[slurm]")'
    if os.geteuid() != 0:
        return "the throwaway SLURM cluster runs its daemons as root"
    return None


@dataclass
class SlurmCluster:
    """Started by :meth:`start`, stopped (all three daemons, by pid) by :meth:`stop`."""

    home: Path  # state, spool, logs, munge socket, slurm.conf
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.home / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Variables a client command (sbatch, squeue, scancel, mbu search --slurm) needs."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)  # munged refuses keys and sockets in folders others can write
        for sub in ("state", "spool", "munge"):
            (self.home / sub).mkdir(exist_ok=True)
        key = self._munge_key()
        socket_path = self.home / "munge" / "munge.socket"
        self._daemon(
            "munged",
            ["--foreground", "--force", f"--socket={socket_path}", f"--key-file={key}"]
            + [f"--pid-file={self.home / 'munge' / 'munged.pid'}", f"--log-file={self.home / 'munged.log'}"]
            + [f"--seed-file={self.home / 'munge' / 'munged.seed'}"],
        )
        self._wait(lambda: socket_path.exists(), timeout, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf(socket_path))
        self._daemon("slurmctld", ["-D", "-i", "-f", str(self.conf)])
        self._daemon("slurmd", ["-D", "-N", NODE, "-f", str(self.conf)])
        self._wait(self._node_idle, timeout, "the SLURM node did not become idle")

    def stop(self) -> None:
        """SIGTERM each daemon this cluster started (slurmd first), SIGKILL what lingers."""
        for name in reversed(DAEMONS):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)

    def cancel_all(self) -> None:
        """Cancel every job still queued or running on this cluster (a failed test's leftovers)."""
        jobs = self.squeue("-o", "%A").split()
        if jobs:
            subprocess.run(["scancel", *jobs], env={**os.environ, **self.env}, check=False)

    def logs(self) -> str:
        """The daemons' log tails, for a failing assertion's message."""
        tails = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.home / name
            if path.is_file():
                tails.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(tails)

    def squeue(self, *args: str) -> str:
        return subprocess.run(
            ["squeue", "-h", *args], env={**os.environ, **self.env}, capture_output=True, text=True, check=True
        ).stdout

    def _munge_key(self) -> Path:
        """The system key when one exists (created by the munge package), else a new one here."""
        if SYSTEM_MUNGE_KEY.is_file():
            key = self.home / "munge" / "munge.key"
            shutil.copyfile(SYSTEM_MUNGE_KEY, key)
        else:
            key = self.home / "munge" / "munge.key"
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        return key

    def _slurm_conf(self, munge_socket: Path) -> str:
        home, host = self.home, socket.gethostname().split(".")[0]
        return f"""ClusterName=mbu-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={home / "state"}
SlurmdSpoolDir={home / "spool"}
SlurmctldPidFile={home / "slurmctld.pid"}
SlurmdPidFile={home / "slurmd.pid"}
SlurmctldLogFile={home / "slurmctld.log"}
SlurmdLogFile={home / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=30
KillWait=30
MinJobAge=600
NodeName={NODE} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""

    def _daemon(self, name: str, args: list[str]) -> None:
        log = open(self.home / f"{name}.out", "w")  # the daemon's own stdout/stderr (start-up errors)
        self.processes[name] = subprocess.Popen(
            [_sbin(name), *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env}
        )
        log.close()

    def _node_idle(self) -> bool:
        for name, process in self.processes.items():
            if process.poll() is not None:
                out = (self.home / f"{name}.out").read_text(errors="replace")
                raise RuntimeError(f"{name} exited with {process.returncode}: {out}\n{self.logs()}")
        try:
            return (
                self.squeue() == ""
                and "idle"
                in subprocess.run(
                    ["sinfo", "-h", "-N", "-o", "%t"], env={**os.environ, **self.env}, capture_output=True, text=True
                ).stdout
            )
        except subprocess.CalledProcessError:
            return False

    def _wait(self, ready, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{message} within {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.5)

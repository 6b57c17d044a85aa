"""A real one-node SLURM cluster on localhost, for tests: munged, slurmctld and slurmd from Debian's packages
(``slurmctld slurmd slurm-client munge``), all state under one scratch directory, on free ports.

Nothing is installed here: ``LocalSlurm.unavailable()`` says why a cluster cannot start (binaries missing,
not root) so that tests skip with that reason; ``.ci/run`` installs the packages. ``stop()`` cancels the
jobs still known and then stops only the daemons this object started, by their PID files.
Short credential expiry (cred_expire=10) and short scheduler intervals make a requeued job start again in
about 10 s instead of about 160 s.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "munge", "unmunge", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "srun")
PACKAGES = "slurmctld slurmd slurm-client munge"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """Running and not a zombie (a killed daemon can linger as one: ``kill -0`` alone says yes)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


class LocalSlurm:
    def __init__(self, base: str | Path) -> None:
        self.base = Path(base)
        self.conf = self.base / "slurm.conf"
        self.munge_socket = self.base / "munge" / "munge.socket"
        self.pid_files = {
            "munged": self.base / "run" / "munged.pid",
            "slurmctld": self.base / "run" / "slurmctld.pid",
            "slurmd": self.base / "run" / "slurmd.pid",
        }
        self._procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, int] = {}  # daemon -> PID, of the ones this object started

    # -- availability ---------------------------------------------------------------------------
    @staticmethod
    def unavailable() -> str | None:
        """Why no local cluster can run here (None when it can)."""
        missing = [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]
        if missing:
            return (
                f"SLURM/munge binaries missing ({', '.join(missing)}): install them with "
                f"`apt-get install -y --no-install-recommends {PACKAGES}` (.ci/run does this when it runs as root)"
            )
        if os.geteuid() != 0:
            return "a local SLURM cluster needs root (slurmd runs jobs as their owner; SlurmdUser=root)"
        return None

    @staticmethod
    def _bin(name: str) -> str:
        return shutil.which(name) or str(Path("/usr/sbin", name))

    # -- configuration ----------------------------------------------------------------------------
    def node_line(self) -> str:
        """``NodeName=localhost`` with this machine's CPU layout (from ``slurmd -C``) and 80 % of its memory."""
        out = subprocess.run([self._bin("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        fields = dict(re.findall(r"(\w+)=(\S+)", out.splitlines()[0]))
        keep = ["CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore"]
        memory = int(int(fields.get("RealMemory", "2000")) * 0.8)
        return " ".join(["NodeName=localhost NodeAddr=127.0.0.1", *(f"{k}={fields[k]}" for k in keep if k in fields)]) + (
            f" RealMemory={memory} State=UNKNOWN"
        )

    def write_config(self) -> None:
        b = self.base
        for d in ("munge", "state", "spool", "run", "log"):
            (b / d).mkdir(parents=True, exist_ok=True)
        os.chmod(b / "munge", 0o755)
        self.conf.write_text(
            f"""ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={b / "state"}
SlurmdSpoolDir={b / "spool"}
SlurmctldPidFile={self.pid_files["slurmctld"]}
SlurmdPidFile={self.pid_files["slurmd"]}
SlurmctldLogFile={b / "log" / "slurmctld.log"}
SlurmdLogFile={b / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=300
{self.node_line()}
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""
        )

    # -- processes ----------------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and, through sbatch's --export=ALL, for jobs)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _daemon(self, name: str, cmd: list[str]) -> None:
        log = (self.base / "log" / f"{name}.stdout").open("w")
        self._procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True, cwd=self.base
        )
        self.started[name] = self._procs[name].pid

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}:\n{self.logs()}")

    def start(self, timeout: float = 60) -> LocalSlurm:
        self.write_config()
        key = self.base / "munge" / "munge.key"
        subprocess.run([self._bin("mungekey"), "-c", "-k", str(key)], check=True, capture_output=True, timeout=30)
        os.chmod(key, 0o600)
        m = self.base / "munge"
        self._daemon(
            "munged",
            [
                self._bin("munged"),
                "-F",
                "--force",
                f"--key-file={key}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.pid_files['munged']}",
                f"--log-file={m / 'munged.log'}",
                f"--seed-file={m / 'munged.seed'}",
            ],
        )
        self._wait("munged", self._munge_ok, timeout)
        self._daemon("slurmctld", [self._bin("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._daemon("slurmd", [self._bin("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait("the node to be idle", lambda: self.node_state() == "idle", timeout)
        return self

    def _munge_ok(self) -> bool:
        if not self.munge_socket.exists():
            return False
        cred = subprocess.run([self._bin("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True, timeout=10)
        if cred.returncode:
            return False
        back = subprocess.run(
            [self._bin("unmunge"), "-S", str(self.munge_socket)], input=cred.stdout, capture_output=True, timeout=10
        )
        return back.returncode == 0

    def node_state(self) -> str:
        r = subprocess.run(["sinfo", "-h", "-N", "-n", "localhost", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return r.stdout.strip()

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for f in sorted((self.base / "log").glob("*")) + [self.base / "munge" / "munged.log"]:
            if f.is_file():
                parts.append(f"== {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # -- jobs -----------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), capture_output=True, text=True, env=self.env, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (finished jobs are kept MinJobAge=300 s); {} when unknown."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout)) if r.returncode == 0 else {}

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float, also=None) -> dict[str, str]:
        """Poll until the job is in one of ``states`` (and ``also(info)`` holds); fail early on a final state
        not asked for."""
        final = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
        deadline = time.time() + timeout
        info: dict[str, str] = {}
        while time.time() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state in states and (also is None or also(info)):
                return info
            if state in final and state not in states:
                raise AssertionError(f"job {job_id} ended {state} (wanted {states}): {info}")
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not {states} after {timeout:.0f} s: {info}")

    def stop(self) -> None:
        """Cancel remaining jobs, then stop the daemons this object started (by PID file, else by the PID it had)."""
        if "slurmctld" in self.started:
            r = self.run("squeue", "-h", "-o", "%i", check=False)
            ids = r.stdout.split()
            if ids:
                self.run("scancel", *ids, check=False)
                deadline = time.time() + 20
                while time.time() < deadline and self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                    time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            if name not in self.started:
                continue
            pid = self.started[name]
            try:  # the PID file must name the process we started (foreground daemons: the same PID)
                recorded = int(self.pid_files[name].read_text().split()[0])
            except (FileNotFoundError, ValueError, IndexError):
                recorded = pid
            if recorded != pid:
                print(f"[slurm_cluster] {self.pid_files[name]} says {recorded}, we started {pid}: stopping {pid} only")
            for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
                if not _alive(pid):
                    break
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.time() + wait
                while time.time() < deadline and _alive(pid):
                    if name in self._procs:
                        self._procs[name].poll()  # reap our child so it does not stay a zombie
                    time.sleep(0.1)
            if name in self._procs:
                try:
                    self._procs[name].wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            del self.started[name]

"""A real SLURM cluster of one node on this machine, for tests and benchmarks.

Debian's ``munged``, ``slurmctld`` and ``slurmd`` run in the foreground as root, each with its
log in a temporary directory, their own munge key and socket, and a ``slurm.conf`` that touches
nothing in /etc (clients find it through ``SLURM_CONF``).  No systemd, no cgroups:
``proctrack/linuxproc`` and ``task/none``.  Accounting is off; the job-completion plugin writes
a text file, so ``sacct --completion`` answers for finished jobs.

This is test code, not part of cax: it starts the daemons with ``subprocess`` directly, because
they must log to files nobody reads and outlive any one command's timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.sshd import free_port

START_TIMEOUT_S = 30.0
BINARIES = ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch")

SLURM_CONF = """\
ClusterName=caxtest
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/log/jobcomp.txt
KillWait=2
InactiveLimit=0
MinJobAge=300
MaxJobCount=20000
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class SlurmUnavailableError(RuntimeError):
    """This machine cannot run the one-node SLURM (packages missing, not root, no start)."""


class SlurmCluster:
    """munged + slurmctld + slurmd under ``root``; ``env`` is what clients need."""

    def __init__(self, root: Path, cpus: int = 2):
        missing = [b for b in BINARIES if not os.access(b, os.X_OK)]
        if missing:
            raise SlurmUnavailableError(f"{', '.join(missing)} missing "
                                        "(apt-get install slurm-wlm munge)")
        if os.geteuid() != 0:
            raise SlurmUnavailableError("the SLURM fixture runs its daemons as root")
        self.root = Path(root)
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # munged wants every directory above its socket open to all (pytest's are 0700)
        self.socket_dir = tempfile.mkdtemp(prefix="cax-munge-")
        os.chmod(self.socket_dir, 0o755)
        self.socket = os.path.join(self.socket_dir, "munge.socket")

    def start(self) -> None:
        r = self.root
        for sub in ("munge", "state", "spool", "log", "run", "jobs"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, timeout=30,
                       capture_output=True)
        self.conf.write_text(SLURM_CONF.format(root=r, socket=self.socket, ctld_port=free_port(),
                                               d_port=free_port(), cpus=self.cpus))
        self._daemon(["/usr/sbin/munged", "-F", f"--key-file={key}",
                      f"--socket={self.socket}", f"--pid-file={r}/munge/munged.pid",
                      f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"],
                     "munged")
        self._wait(lambda: Path(self.socket).exists(), "munged socket")
        self._daemon(["/usr/sbin/slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), "slurmctld")
        self._daemon(["/usr/sbin/slurmd", "-D", "-N", "localhost", "-f", str(self.conf)],
                     "slurmd")
        self._wait(lambda: self._ok(["sinfo", "-h", "-o", "%t"], "idle"), "idle node")

    def _daemon(self, argv: list[str], name: str) -> None:
        with open(self.root / "log" / f"{name}.out", "ab") as out:
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))

    def _ok(self, argv: list[str], expect: str) -> bool:
        try:
            done = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0 and expect in done.stdout

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            dead = [p for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                self.stop()
                log = "\n".join(p.read_text()[-2000:] for p in (self.root / "log").glob("*")
                                if p.is_file())
                raise SlurmUnavailableError(f"SLURM fixture: {what} did not come up:\n{log}")
            time.sleep(0.1)

    def run(self, *argv: str, timeout: float = 30) -> str:
        """Run a SLURM client command against this cluster; return its stdout."""
        done = subprocess.run(list(argv), env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=True)
        return done.stdout

    def cancel_all(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True,
                       timeout=30)

    def stop(self) -> None:
        """Stop the daemons (slurmd first), by the PIDs this fixture started."""
        if not self.procs:
            return
        try:
            self.cancel_all()
            deadline = time.monotonic() + 20  # let slurmd end the job steps it started
            while self.run("squeue", "--noheader", "--user=root").strip() and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def available() -> str | None:
    """Return why the fixture cannot run here, or None."""
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        return f"{', '.join(missing)} missing (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the SLURM fixture runs its daemons as root"
    return None

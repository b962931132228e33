"""A real Slurm cluster on localhost for the tests: munge, slurmctld and emulated nodes (one slurmd process each, n1
and n2 unless told, each with 2 CPUs and 2 fake GPUs), a preemptible ``debug`` partition and a higher-priority
``urgent`` one.

Everything lives under one folder; ``stop`` kills exactly the processes it started (by pid, checked against their
command name) and removes the folder. Recipe: ../shared/slurm-local.md.
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

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = {"munged", "slurmctld", "slurmd"}


def ensure_installed():
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged", "mungekey")):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"Slurm is not installed: apt-get install {' '.join(PACKAGES)} (scripts/setup.sh does)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   capture_output=True)


class LocalSlurm:
    def __init__(self, root: Path, port: int | None = None, nodes=("n1", "n2"), gpus_per_node: int = 2):
        self.root, self.nodes, self.gpus = Path(root), nodes, gpus_per_node
        self.port = port or free_ports(1 + len(nodes))  # slurmctld, then one slurmd per node
        self.conf = self.root / "etc" / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ------------------------------------------------------------------------------------------ lifecycle
    def start(self):
        ensure_installed()
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        r.chmod(0o711)  # munged wants execute permission for all on every directory above its socket
        for d in ("etc", "run", "log", "spool/ctld", "munge", *(f"spool/d-{n}" for n in self.nodes)):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o711)
        subprocess.run(["mungekey", "-c", "-k", str(r / "munge/munge.key")], check=True, capture_output=True)
        subprocess.run(["munged", "--key-file", str(r / "munge/munge.key"), "--socket", str(r / "munge/munge.sock"),
                        "--pid-file", str(r / "munge/munged.pid"), "--log-file", str(r / "log/munged.log"),
                        "--seed-file", str(r / "munge/munged.seed")], check=True, capture_output=True)
        self._write_conf()
        self._run(["slurmctld", "-i"])
        for n in self.nodes:
            self._run(["slurmd", "-N", n])
        self._wait(lambda: self.out(["sinfo", "-h", "-N", "-o", "%T"]).split() and
                   set(self.out(["sinfo", "-h", "-N", "-o", "%T"]).split()) == {"idle"}, 60, "nodes to be idle")
        return self

    def _write_conf(self):
        # KillWait: 30 s between SIGTERM and SIGKILL (Slurm's default), time enough for the
        # step in progress and a checkpoint on a loaded 2-core machine; a job that exits sooner is not delayed.
        # cred_expire: a requeued job may start again cred_expire + 1 s after its requeue (Slurm's default of 120 s
        # would hold every requeue test for two minutes); 5 is the least slurmctld 22.05 accepts (below it, the
        # default is used), ample for a step launch on one host.
        r, host = self.root, socket.gethostname().split(".")[0]
        gres = []
        nodes = []
        for i, n in enumerate(self.nodes):
            for g in range(self.gpus):
                dev = r / f"fakegpu-{n}-{g}"
                if not dev.exists():
                    os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/null
                gres.append(f"NodeName={n} Name=gpu File={dev}")
            nodes.append(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.port + 1 + i} CPUs=2 "
                         f"RealMemory=4000 Gres=gpu:{self.gpus} State=UNKNOWN")
        (r / "etc" / "gres.conf").write_text("\n".join(gres) + "\n")
        names = ",".join(self.nodes)
        self.conf.write_text("\n".join([
            "ClusterName=mvtest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", f"SlurmctldPort={self.port}",
            f"SlurmdPort={self.port + 1}", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge/munge.sock,cred_expire=5", f"StateSaveLocation={r}/spool/ctld",
            f"SlurmdSpoolDir={r}/spool/d-%n", f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid", f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log", "MailProg=/bin/true", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/affinity", "AccountingStorageType=accounting_storage/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none", "JobRequeue=1", "KillWait=30",
            "MinJobAge=3600", "SchedulerParameters=sched_interval=2,bf_interval=2", "GresTypes=gpu",
            "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE", "SlurmctldParameters=preempt_send_user_signal",
            *nodes,
            f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10",
            f"PartitionName=urgent Nodes={names} MaxTime=INFINITE State=UP PriorityTier=2", ""]))

    def pids(self) -> list[int]:
        files = [*(self.root / "run").glob("*.pid"), self.root / "munge" / "munged.pid"]
        pids = []
        for f in files:
            try:
                pid = int(f.read_text().strip())
                if Path(f"/proc/{pid}/comm").read_text().strip() in DAEMONS:
                    pids.append(pid)
            except (OSError, ValueError):
                pass
        return pids

    def stop(self):
        pids = self.pids()
        if self.conf.exists():
            for cmd in (["scancel", "--full", "-u", "root"], ["scontrol", "shutdown"]):
                subprocess.run(cmd, env=self.env, capture_output=True, timeout=20)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------------------------------- commands
    def _run(self, cmd):
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=60)

    def out(self, cmd, env=None, cwd=None) -> str:
        res = subprocess.run(cmd, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60, cwd=cwd)
        if res.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))}: {res.stderr.strip()}")
        return res.stdout

    def sbatch(self, *args, env=None, cwd=None) -> str:
        """Submit from ``cwd`` (default: this process's folder), as a user does from where they stand."""
        return self.out(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd).strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict]:
        """Every job (array elements included) of ``job_id`` as scontrol's key=value fields."""
        text = self.out(["scontrol", "show", "job", "-o", job_id])
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line.strip()]

    def wait(self, job_id: str, timeout: float, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY")) -> list[dict]:
        """Wait until every element of the job is in one of the states ``until``."""
        jobs = []

        def done():
            nonlocal jobs
            jobs = self.jobs(job_id)
            return jobs and all(j["JobState"] in until for j in jobs)
        self._wait(done, timeout, f"job {job_id} to reach {until}", lambda: jobs)
        return jobs

    def log(self, name: str) -> str:
        path = self.root / "log" / name
        return path.read_text()[-4000:] if path.exists() else ""

    def _wait(self, cond, timeout, what, state=lambda: ""):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if cond():
                    return
            except RuntimeError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout} s for {what}; last state {state()}\n{self.log('slurmctld.log')}")


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def free_ports(count: int, first: int = 16817) -> int:
    """The first of ``count`` consecutive free ports on 127.0.0.1 from ``first`` on (a fixed block can be taken by
    another cluster or any other program)."""
    for base in range(first, first + 2000, count):
        sockets = [socket.socket() for _ in range(count)]
        try:
            for i, s in enumerate(sockets):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} free consecutive ports from {first}")

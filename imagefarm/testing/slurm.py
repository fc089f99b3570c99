"""A real SLURM cluster of one or more nodes in a temporary directory (Debian's slurm-wlm).

munged, slurmctld and one slurmd per node run as child processes with their own key,
socket, ports, state and spool; client commands find the cluster through
``SLURM_CONF`` (``.env``). Nothing under /etc is touched, and ``close()`` stops
everything. Several nodes share this host the way slurmd allows it: one ``NodeName``
line per node with its own ``Port=`` and ``NodeAddr`` (node N at 127.0.1.N, so
what a job on a node publishes on its address is told apart), spool, pid and log
files named with ``%n``, and ``slurmd -N NAME`` per node.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from imagefarm.host.containers import which
from imagefarm.errors import ToolError
from imagefarm.host.services import free_port

NODE = "ifnode1"


def node_name(i: int) -> str:
    return f"ifnode{i}"


def node_addr(i: int, nodes: int) -> str:
    """127.0.0.1 for a single node (as before), else 127.0.1.i."""
    return "127.0.0.1" if nodes == 1 else f"127.0.1.{i}"


@dataclass
class SlurmCluster:
    workdir: Path
    nodes: int = 1
    procs: list[subprocess.Popen] = field(default_factory=list)
    _own: bool = False

    @classmethod
    def create(cls, workdir: Path | None = None, nodes: int = 1) -> "SlurmCluster":
        own = workdir is None
        return cls(Path(workdir or tempfile.mkdtemp(prefix="imagefarm-slurm-")), nodes=nodes, _own=own)

    @property
    def node_names(self) -> list[str]:
        return [node_name(i) for i in range(1, self.nodes + 1)]

    @property
    def conf(self) -> Path:
        return self.workdir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def _write_config(self) -> None:
        w = self.workdir
        for d in ("state", "spool", "log", "munge", *(f"spool/{n}" for n in self.node_names)):
            (w / d).mkdir(parents=True, exist_ok=True)
        os.chmod(w / "munge", 0o700)
        key = w / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        host = socket.gethostname().split(".")[0]
        cpus = os.cpu_count() or 2
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8 / self.nodes)
        nodes = [f"NodeName={node_name(i)} NodeHostname={host} NodeAddr={node_addr(i, self.nodes)} "
                 f"Port={free_port()} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN"
                 for i in range(1, self.nodes + 1)]
        one = self.nodes == 1
        self.conf.write_text("\n".join([
            "ClusterName=imagefarm",
            f"SlurmctldHost={host}(127.0.0.1)",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={w / 'munge' / 'munge.sock'}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={free_port()}",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool' if one else w / 'spool' / '%n'}",
            f"SlurmctldPidFile={w / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / ('slurmd.pid' if one else 'slurmd-%n.pid')}",
            f"SlurmctldLogFile={w / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={w / 'log' / ('slurmd.log' if one else 'slurmd-%n.log')}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "KillWait=5",
            *nodes,
            f"PartitionName=cpu Nodes={','.join(self.node_names)} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=FORCE:4",
            "",
        ]))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.workdir / "log" / f"{name}.out", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> "SlurmCluster":
        for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
            which(tool)
        self._write_config()
        m = self.workdir / "munge"
        self._spawn("munged", [which("munged"), "-F", "--force",
                               f"--socket={m / 'munge.sock'}", f"--key-file={m / 'munge.key'}",
                               f"--log-file={m / 'munged.log'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}"])
        self._wait(lambda: (m / "munge.sock").exists(), "munged socket")
        self._spawn("slurmctld", [which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for name in self.node_names:
            self._spawn(f"slurmd-{name}", [which("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
        self._wait(self._node_ready, "the SLURM nodes to become idle", timeout=60)
        return self

    def _node_ready(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env)
        states = out.stdout.split()
        return (out.returncode == 0 and len(states) == self.nodes
                and all(s in ("idle", "mixed", "allocated") for s in states))

    def _wait(self, cond, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise ToolError(f"{Path(p.args[0]).name} exited while waiting for {what}:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.2)
        raise ToolError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        out = []
        for f in sorted((self.workdir / "log").glob("*")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"== {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    def sbatch(self, script: Path, *args: str, env: dict[str, str] | None = None,
               script_args: tuple[str, ...] = ()) -> str:
        """``sbatch [args] script [script_args]``; the job id."""
        proc = subprocess.run(["sbatch", "--parsable", *args, str(script), *script_args], capture_output=True, text=True,
                              env={**self.env, **(env or {})})
        if proc.returncode != 0:
            raise ToolError(f"sbatch {script.name} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def state(self, job_id: str) -> str:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             env=self.env).stdout.strip()
        if out:
            return out
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=self.env).stdout
        for tok in out.split():
            if tok.startswith("JobState="):
                return tok.split("=", 1)[1]
        return "UNKNOWN"

    def cancel(self, job_id: str) -> None:
        subprocess.run(["scancel", job_id], capture_output=True, env=self.env)

    def close(self) -> None:
        subprocess.run(["scancel", "--user", "root"], capture_output=True, env=self.env)
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

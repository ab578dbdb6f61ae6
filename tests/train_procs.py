"""qwen2-train as real processes: one, or several joined on loopback (`--coordinator-address
127.0.0.1:PORT --num-processes N --process-id I`), each with its own count of fake CPU devices.

Output goes to files (a long run would fill a pipe); `Job.wait` returns every process's exit code,
stdout and stderr, and kills what is left when the time is up, so no test can hang."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time

from session_once import built_once
from xla_env import run_xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("configs", "train", "tiny-cpu.yaml")
# a short run of configs/train/tiny-cpu.yaml: a checkpoint every 4 steps, held-out loss at 4 and 8
SHORT_RUN = (
    "total_steps=10",
    "checkpoint_every=4",
    "log_every=1",
    "eval_every=4",
    "eval_batches=1",
    "seq_len=64",
    "loss.chunk_length=32",
    "progress=false",
)


def env(devices: int) -> dict[str, str]:
    out = dict(os.environ)
    out["XLA_FLAGS"] = run_xla_flags(devices)
    out["JAX_PLATFORMS"] = "cpu"
    out["PYTHONPATH"] = REPO + os.pathsep + out.get("PYTHONPATH", "")
    out.pop("QWEN2_JAX_DEBUG", None)
    return out


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(output_dir, cache_dir, *overrides) -> list[str]:
    sets = [f"output_dir={output_dir}", f"data.cache_dir={cache_dir}", *SHORT_RUN, *overrides]
    cmd = [sys.executable, "-m", "train", "--config", CONFIG]
    for s in sets:
        cmd += ["--set", s]
    return cmd


@dataclasses.dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


class Job:
    """`processes` copies of `cmd` (process i with `extra[i]` appended), joined when more than one."""

    def __init__(self, cmd, *, processes: int, devices: int, logs_dir, extra=None):
        os.makedirs(logs_dir, exist_ok=True)
        port = free_port()
        self.procs, self.logs = [], []
        for i in range(processes):
            full = list(cmd) + list((extra or {}).get(i, []))
            if processes > 1:
                full += ["--coordinator-address", f"127.0.0.1:{port}", "--num-processes", str(processes)]
                full += ["--process-id", str(i)]
            out_path = os.path.join(logs_dir, f"process{i}.out")
            err_path = os.path.join(logs_dir, f"process{i}.err")
            with open(out_path, "w") as out, open(err_path, "w") as err:
                self.procs.append(subprocess.Popen(full, cwd=REPO, env=env(devices), stdout=out, stderr=err))
            self.logs.append((out_path, err_path))

    def signal(self, index: int, sig=signal.SIGTERM) -> None:
        self.procs[index].send_signal(sig)

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float) -> list[Result]:
        """Every process's result; those still running after `timeout` seconds are killed and
        reported with timed_out=True."""
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        timed_out = [p.poll() is None for p in self.procs]
        for p, late in zip(self.procs, timed_out):
            if late:
                p.kill()
                p.wait()
        return [Result(p.returncode, _read(o), _read(e), t) for p, (o, e), t in zip(self.procs, self.logs, timed_out)]


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def run(cmd, *, processes=1, devices=8, logs_dir, timeout=900, extra=None) -> list[Result]:
    return Job(cmd, processes=processes, devices=devices, logs_dir=logs_dir, extra=extra).wait(timeout)


def records(output_dir) -> list[dict]:
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def losses(output_dir, key="loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(output_dir) if key in r}


def wait_for_step(job: Job, output_dir, step: int, timeout: float = 600) -> bool:
    """True once metrics.jsonl has `step`; False when the job ended or the time is up first."""
    deadline = time.time() + timeout
    while time.time() < deadline and job.running():
        if any(r["step"] >= step for r in records(output_dir)):
            return True
        time.sleep(0.05)
    return False


def checkpoint_steps(output_dir) -> list[int]:
    directory = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def max_difference(a: dict[int, float], b: dict[int, float]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) for s in a)


def tail(results: list[Result], n=3000) -> str:
    return "\n".join(f"--- process {i} (exit {r.returncode}):\n{r.stderr[-n:]}" for i, r in enumerate(results))


# Runs shared by the test modules of one session (pytest's tmp_path_factory is session-wide).
_shared: dict[str, str] = {}


def shared_cache_dir(tmp_path_factory) -> str:
    """One prepared copy of the built-in corpus for every run of the session."""
    if "cache" not in _shared:
        _shared["cache"] = str(tmp_path_factory.mktemp("data-cache"))
    return _shared["cache"]


REFERENCE_MESH = ("mesh.data=2", "mesh.fsdp=4")


def reference_run(tmp_path_factory) -> str:
    """The unbroken short run: 1 process x 8 devices, mesh data=2 x fsdp=4, run once per session even
    across xdist workers (test_train_multiprocess.py and test_train_elastic.py read it)."""

    def build(base):
        # the data cache of the worker that builds it: no other process prepares into that one meanwhile
        results = run(command(str(base / "run"), shared_cache_dir(tmp_path_factory), *REFERENCE_MESH), logs_dir=base)
        assert results[0].returncode == 0, tail(results)

    return str(built_once(tmp_path_factory, "reference", build) / "run")

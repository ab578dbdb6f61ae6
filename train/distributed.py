"""Several processes as one run (jax.distributed): start-up, agreement between processes, failures.

Start-up (`start`), before anything touches a device:
  * explicit: `--coordinator-address HOST:PORT --num-processes N --process-id I` on every process
    (the same address and N everywhere; process 0 runs the coordinator on HOST:PORT);
  * automatic, with no flags: on a Cloud TPU VM (every worker of a pod slice), under SLURM (`srun`
    with more than one task) and under Open MPI (`mpirun` with more than one rank),
    `jax.distributed.initialize()` reads the cluster's own environment;
  * otherwise a single process.
On CPU the collectives go through gloo. A single process with several CPU devices training a dense
model starts a one-process jax.distributed on a free loopback port for that alone
(`start_local_gloo`): JAX's in-process CPU collectives add in another order than gloo, so without it
1 process x 8 devices and 2 processes x 4 devices on the same mesh differ in the last bit of every
reduction, which 20 steps of tiny-cpu grow to 1e-3 (8e-3 by step 25). With it they agree bit for bit,
for ~25% of the single process's speed on CPU. MoE runs keep the in-process collectives: their step
is ~75x slower through gloo (measured on tiny-moe-cpu, 4 devices), and so is a multi-process MoE
run on CPU.

Failures: an exception on any process stops every process with that process's message. The
failing process publishes `(exit code, "process I: message")` in the coordinator's key-value store
and exits at once; every process runs a watchdog thread blocked on that key, which prints the
message and exits with the same code, even while its main thread waits in a collective that will
never complete. A process that dies without a word (SIGKILL, a crash) is caught by JAX's heartbeat
(`heartbeat_timeout_seconds`), or by the watchdog losing the coordinator when it was process 0.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from qwen2_jax.cli_support import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    USER_ERRORS,
    UsageError,
    one_line,
    report_error,
)

T = TypeVar("T")

_PREFIX = "qwen2-train"
ERROR_KEY = f"{_PREFIX}/error"
ACK_KEY = f"{_PREFIX}/error-seen"
# How long a process that is about to exit on an error waits for the others to have read it, when
# it is process 0 (the coordinator's key-value store goes away with it).
ACK_WAIT_MS = 10_000
EXIT_GRACE_S = 1.0  # then for them to be gone
# The barriers wait for work of unknown length on process 0 (preparing a corpus): long; a failure
# there ends the wait through the watchdog, not through the timeout.
LONG_WAIT_MS = 24 * 3600 * 1000

_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


class _State:
    prog = _PREFIX
    client: Any = None  # the jax.distributed client, when this run has several processes
    process_id = 0
    num_processes = 1
    finished = False  # set before a normal shutdown: the watchdog then stays quiet
    lock = threading.Lock()
    exiting = False


_state = _State()


# --------------------------------------------------------------------------------------------
# Start-up


def detect_cluster(environ=None) -> str | None:
    """The cluster whose environment `jax.distributed.initialize()` reads by itself: "tpu" (a Cloud
    TPU VM), "slurm" (more than one task), "ompi" (more than one rank), or None."""
    environ = os.environ if environ is None else environ
    if all(v in environ for v in _SLURM_VARS) and _int(environ.get("SLURM_NTASKS")) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ.get("OMPI_COMM_WORLD_SIZE")) > 1:
        return "ompi"
    if _on_cloud_tpu_vm():
        return "tpu"
    return None


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _on_cloud_tpu_vm() -> bool:
    try:  # set when jax is imported, from libtpu and the TPU chips present (no backend started)
        from jax._src import cloud_tpu_init

        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except Exception:
        return False


def _cpu_device_count() -> int:
    """How many CPU devices this process will have when its backend is CPU; 0 when it may be an
    accelerator (decided before the backend starts, as jax.distributed must be)."""
    import jax

    platforms = (jax.config.jax_platforms or "").strip().lower()
    if platforms != "cpu":
        if platforms:
            return 0
        try:
            from jax._src import hardware_utils as hw

            if hw.has_visible_nvidia_gpu() or hw.num_available_tpu_chips_and_device_id()[0]:
                return 0
            if hw.num_available_amd_gpus(stop_at=1):
                return 0
        except Exception:
            return 0
    count = int(getattr(jax.config, "jax_num_cpu_devices", -1) or -1)
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    if match:
        count = max(count, int(match.group(1)))
    return max(count, 1)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    prog: str = _PREFIX,
) -> int:
    """Join the run's other processes (see the module docstring); returns the process count (1 when
    there are none). UsageError for a partial set of flags or a process id out of range."""
    _state.prog = prog
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UsageError("--coordinator-address, --num-processes and --process-id go together")

    if all(given):
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UsageError(f"--process-id {process_id} is not in 0..{num_processes - 1} (--num-processes)")
        if ":" not in coordinator_address:
            raise UsageError(f"--coordinator-address {coordinator_address!r} is not HOST:PORT")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    elif detect_cluster() is not None:
        kwargs = {}
    else:
        return 1
    return _initialize(kwargs, prog)


def start_local_gloo() -> bool:
    """For a single process with several CPU devices (no cluster, no flags): a one-process
    jax.distributed on a free loopback port, so that its collectives go through gloo as a
    multi-process run's do (see the module docstring). Call after `start`, before anything touches
    a device; True when it did so."""
    from jax._src import xla_bridge

    if _state.client is not None or xla_bridge.backends_are_initialized() or _cpu_device_count() < 2:
        return False
    address = f"127.0.0.1:{_free_loopback_port()}"
    kwargs = dict(coordinator_address=address, num_processes=1, process_id=0, coordinator_bind_address=address)
    return _initialize(kwargs, _state.prog) == 1


def _initialize(kwargs: dict, prog: str) -> int:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:
        if kwargs:
            raise
        # a TPU VM whose metadata names no workers (TPU_SKIP_MDS_QUERY, a bare VM): one process
        sys.stderr.write(f"{prog}: no cluster found ({one_line(e)}); running as a single process\n")
        return 1
    from jax._src import distributed as _jd

    _state.client = _jd.global_state.client
    _state.process_id = jax.process_index()
    _state.num_processes = jax.process_count()
    if _state.num_processes > 1:
        threading.Thread(target=_watch, name="qwen2-train-watchdog", daemon=True).start()
    return _state.num_processes


def is_multiprocess() -> bool:
    return _state.client is not None and _state.num_processes > 1


def process_index() -> int:
    return _state.process_id


# --------------------------------------------------------------------------------------------
# Failures


def _classify(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message run_cli gives `exc`."""
    if isinstance(exc, USER_ERRORS):
        return EXIT_USAGE, one_line(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    return EXIT_FAILURE, one_line(f"{type(exc).__name__}: {exc}")


@contextmanager
def failures_stop_all() -> Iterator[None]:
    """An exception inside is published to every process (their watchdogs exit with it), then
    re-raised here, so this process reports it as usual and `exit_code` ends it. When another
    process failed first (this exception often being the consequence: a collective whose peer is
    gone), this process reports that one's message and code instead."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as exc:
        if is_multiprocess():
            code, message = _classify(exc)
            first = _publish(code, f"process {_state.process_id}: {message}")
            if first is not None:
                report_error(_state.prog, first[1])
                _hard_exit(first[0])
        raise


def _publish(code: int, message: str) -> tuple[int, str] | None:
    """Publish this process's failure; returns (code, message) of another process's failure that
    was published first, if any."""
    client = _state.client
    try:
        client.key_value_set(ERROR_KEY, f"{code}\t{_state.process_id}\t{message}")
        return None
    except Exception:
        pass
    try:
        code_text, origin, first = client.key_value_try_get(ERROR_KEY).split("\t", 2)
    except Exception:
        return None
    return None if int(origin) == _state.process_id else (int(code_text), first)


def exit_code(code: int) -> int:
    """Leave the run: after a success the processes shut down together (JAX's shutdown barrier);
    after a failure this process exits at once, without waiting for the others at that barrier."""
    if not is_multiprocess():
        return code
    if code == 0:
        shutdown()
        return code
    _hard_exit(code)
    return code  # not reached


def shutdown() -> None:
    if _state.client is None:
        return
    _state.finished = True
    import jax

    jax.distributed.shutdown()
    _state.client = None


def _hard_exit(code: int) -> None:
    with _state.lock:
        if _state.exiting:
            threading.Event().wait()  # the other thread is already ending the process
        _state.exiting = True
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    client = _state.client
    if client is not None:
        try:  # the last thing before exiting: once process 0 has every ack, it exits, and JAX aborts
            client.key_value_set(f"{ACK_KEY}/{_state.process_id}", "1")  # the processes still connected
        except Exception:
            pass
        if _state.process_id == 0:
            # the key-value store lives in this process: let the others read the error and exit first
            for p in range(1, _state.num_processes):
                try:
                    client.blocking_key_value_get(f"{ACK_KEY}/{p}", ACK_WAIT_MS)
                except Exception:
                    break
            time.sleep(EXIT_GRACE_S)
    os._exit(code)


def _watch() -> None:
    """Block on the error key; when another process publishes, print its message and exit."""
    client = _state.client
    while True:
        try:
            value = client.blocking_key_value_get(ERROR_KEY, 3_600_000)
        except Exception as e:  # a timeout, a shutdown, or the coordinator gone
            if _state.finished or _state.exiting:
                return
            text = str(e)
            if "DEADLINE_EXCEEDED" in text or "timed out" in text.lower():
                continue
            report_error(_state.prog, f"lost contact with the coordinator (process 0): {one_line(text)}")
            _hard_exit(EXIT_FAILURE)
            return
        code_text, origin, message = value.split("\t", 2)
        if int(origin) == _state.process_id or _state.exiting:
            return  # our own failure: the main thread reports it
        report_error(_state.prog, message)
        _hard_exit(int(code_text))
        return


# --------------------------------------------------------------------------------------------
# Agreement between processes


def barrier(name: str, timeout_ms: int = LONG_WAIT_MS) -> None:
    if is_multiprocess():
        _state.client.wait_at_barrier(f"{_PREFIX}/{name}", timeout_ms)


def process_0_first(name: str, fn: Callable[[], T]) -> T:
    """`fn()` on process 0, then on the others (e.g. preparing a corpus: on a shared filesystem the
    others find process 0's result; on local disks each prepares its own copy, the same one)."""
    if not is_multiprocess():
        return fn()
    if _state.process_id == 0:
        result = fn()
        barrier(name)
        return result
    barrier(name)
    return fn()


def any_process(flag: bool) -> list[int]:
    """The processes whose `flag` is set (all processes call this at the same point)."""
    if not is_multiprocess():
        return [0] if flag else []
    import numpy as np
    from jax.experimental import multihost_utils

    flags = np.asarray(multihost_utils.process_allgather(np.int32(bool(flag))))
    return [int(p) for p in np.flatnonzero(flags.reshape(-1))]


def agree(name: str, value: str) -> str:
    """Process 0's `value`, on every process (through the key-value store)."""
    if not is_multiprocess():
        return value
    key = f"{_PREFIX}/{name}"
    if _state.process_id == 0:
        _state.client.key_value_set(key, value)
        return value
    return _state.client.blocking_key_value_get(key, LONG_WAIT_MS)


def check_shared_directory(directory: str) -> None:
    """UsageError unless every process sees what process 0 writes into `directory`: checkpoints
    and the data iterator's position must be one copy that all processes read and write."""
    if not is_multiprocess():
        return
    path = os.path.join(directory, ".qwen2-train-processes")
    token = agree("shared-dir-token", uuid.uuid4().hex)
    if _state.process_id == 0:
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.write(token)
        os.replace(tmp, path)
    barrier("shared-dir-written", 600_000)
    try:
        with open(path) as f:
            seen = f.read().strip()
    except OSError:
        seen = None
    missing = any_process(seen != token)
    if missing:
        raise UsageError(
            f"output_dir {directory} is not one directory shared by all processes: process(es) "
            f"{', '.join(map(str, missing))} do not see what process 0 wrote there; put it on a filesystem "
            "every host mounts (NFS, Lustre, Filestore, a Cloud Storage FUSE mount)"
        )

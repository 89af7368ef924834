"""Launch one `jax.distributed` job of N CPU processes on 127.0.0.1 (the multi-controller tests),
and join it from a worker process."""
import contextlib
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(worker: str, processes: int, out, extra_args=(), timeout_s: float = 150.0, what: str = "job"):
    """Run `worker <index> <processes> <port> <out> *extra_args` in each process; fail the test
    with every process's log tail when one exits non-zero or the whole job exceeds `timeout_s`."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # conftest's 8 devices: not here
    env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, worker, str(i), str(processes), port, str(out),
                               *map(str, extra_args)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    import pytest

    deadline = time.monotonic() + timeout_s  # one limit for the whole job: a hang fails cleanly
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        tails = logs + [p.communicate()[0] or "" for p in procs[len(logs):]]
        text = "\n".join(f"--- process {i}:\n{t[-2000:]}" for i, t in enumerate(tails))
        pytest.fail(f"the {processes}-process {what} did not finish in {timeout_s:g} s\n{text}")
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"


@contextlib.contextmanager
def joined(process_id, num_processes, port, local_devices: int = 4):
    """In a worker: this process's part of the job, `local_devices` CPU devices of its own."""
    os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts; a worker is an entry point
    import jax

    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=int(num_processes),
                               process_id=int(process_id), initialization_timeout=60)
    try:
        yield jax
    finally:
        jax.distributed.shutdown()

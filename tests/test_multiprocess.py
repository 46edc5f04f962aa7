"""Sync BN across processes: 2 processes x 2 CPU devices on 127.0.0.1.

Each process runs ``tests/_multiprocess_worker.py``, feeds its own half of the
batch and checks outputs, new state and gradients against batch norm of the
global batch (float64 NumPy), under ``shard_map`` with ``axis_name`` and
under SPMD ``jit`` without one. Every wait is bounded and no child outlives
the test.
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

WORKER = pathlib.Path(__file__).resolve().parent / "_multiprocess_worker.py"
NUM_PROCESSES = 2
TIMEOUT_S = 90


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_sync_batch_norm_across_two_processes(tmp_path):
  env = dict(os.environ)
  # The parent has 8 simulated devices; each child has 2 of its own.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  procs, logs = [], []
  try:
    for i in range(NUM_PROCESSES):
      log = open(tmp_path / f"process_{i}.log", "w+")
      logs.append(log)
      procs.append(
        subprocess.Popen(
          [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port)],
          stdout=log,
          stderr=subprocess.STDOUT,
          env=env,
          cwd=tmp_path,
        )
      )
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1.0))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait(timeout=10)
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read())
      log.close()
  for i, (p, out) in enumerate(zip(procs, outputs, strict=True)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert f"process {i}: shard_map matches the global batch" in out, out
    assert f"process {i}: jit matches the global batch" in out, out
    assert f"process {i}: OK" in out, out

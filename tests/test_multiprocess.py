"""Sync BN across processes: 2 processes x 2 CPU devices on 127.0.0.1.

Each process runs ``tests/_multiprocess_worker.py``, feeds its own half of the
batch and checks outputs, new state and gradients against batch norm of the
global batch (float64 NumPy), under ``shard_map`` with ``axis_name`` and
under SPMD ``jit`` without one. A second test kills one process before the
first collective and checks that the other one does not hang: it aborts
within a bound set by the worker's heartbeat timeout, saying why. Every wait
is bounded and no child outlives the test.
"""

import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest
from _multiprocess_worker import HEARTBEAT_TIMEOUT_S

WORKER = pathlib.Path(__file__).resolve().parent / "_multiprocess_worker.py"
NUM_PROCESSES = 2
TIMEOUT_S = 90
# What jax.distributed prints before it aborts a survivor (jax 0.10.2):
# "Terminating process because the JAX distributed service detected fatal
# errors. This most likely indicates that another task died; ...", then
# "UNAVAILABLE: The following tasks are unhealthy (stopped sending
# heartbeats)" when process 0 sees another one go, or "UNAVAILABLE: Failed to
# send RPC to coordination service. Either the leader task was
# preempted/died/restarted unexpectedly ..." when process 0 itself is gone.
PEER_GONE = re.compile(r"\bdied\b|unhealthy|heartbeat|unavailable", re.IGNORECASE)


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(tmp_path, extra_args):
  """Runs one worker per entry of ``extra_args``, ``TIMEOUT_S`` in all.

  Returns each process's return code (``None`` if it had to be killed), the
  monotonic time it was seen to exit, and its output (stdout and stderr).
  """
  env = dict(os.environ)
  # The parent has 8 simulated devices; each child has 2 of its own.
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  port = _free_port()
  n = len(extra_args)
  procs, logs, exited, returncodes = [], [], [None] * n, [None] * n
  try:
    for i, extra in enumerate(extra_args):
      log = open(tmp_path / f"process_{i}.log", "w+")
      logs.append(log)
      procs.append(
        subprocess.Popen(
          [sys.executable, str(WORKER), str(i), str(n), str(port), *extra],
          stdout=log,
          stderr=subprocess.STDOUT,
          env=env,
          cwd=tmp_path,
        )
      )
    deadline = time.monotonic() + TIMEOUT_S
    while None in exited and time.monotonic() < deadline:
      for i, p in enumerate(procs):
        if exited[i] is None and p.poll() is not None:
          exited[i], returncodes[i] = time.monotonic(), p.returncode
      time.sleep(0.05)
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
  return returncodes, exited, outputs


@pytest.mark.slow
def test_sync_batch_norm_across_two_processes(tmp_path):
  returncodes, _, outputs = _run_workers(tmp_path, [[]] * NUM_PROCESSES)
  for i, (rc, out) in enumerate(zip(returncodes, outputs, strict=True)):
    assert rc == 0, f"process {i} failed (return code {rc}):\n{out[-4000:]}"
    assert f"process {i}: shard_map matches the global batch" in out, out
    assert f"process {i}: jit matches the global batch" in out, out
    assert f"process {i}: OK" in out, out


@pytest.mark.slow
@pytest.mark.parametrize("dead", [1, 0], ids=["peer_dies", "coordinator_dies"])
def test_survivor_aborts_when_a_peer_dies(tmp_path, dead):
  survivor = 1 - dead
  extra = [["--die"] if i == dead else [] for i in range(NUM_PROCESSES)]
  returncodes, exited, outputs = _run_workers(tmp_path, extra)
  out = outputs[survivor]
  assert returncodes[dead] == 1, f"return code {returncodes[dead]}:\n{outputs[dead]}"
  assert f"process {dead}: dying before the collective" in outputs[dead]
  # Killed at TIMEOUT_S, or a clean exit: either way it hung or missed the death.
  assert returncodes[survivor] not in (None, 0), (
    f"survivor return code {returncodes[survivor]}:\n{out[-4000:]}"
  )
  # Process 0 notices a silent peer after HEARTBEAT_TIMEOUT_S (about 11 s seen);
  # the others notice at once that process 0, which runs the service, is gone.
  waited = exited[survivor] - exited[dead]
  assert waited < 3 * HEARTBEAT_TIMEOUT_S, (
    f"survivor took {waited:.1f} s after its peer died:\n{out[-4000:]}"
  )
  assert PEER_GONE.search(out), out[-4000:]
  if dead != 0:  # then the survivor has seconds to get there before it aborts
    assert f"process {survivor}: entering the collectives" in out, out[-4000:]

"""One process of ``tests/test_multiprocess.py``: sync BN across processes.

Run as ``python _multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT [--die]``
with ``XLA_FLAGS=--xla_force_host_platform_device_count=2``. Every process builds
the same global batch from a fixed seed, feeds only its own rows with
``jax.make_array_from_process_local_data``, and checks what its devices hold
against batch norm of the global batch in float64 NumPy. It prints ``OK`` and
exits 0, or raises.

With ``--die`` the process exits (status 1, no clean-up) once its arrays are
built, just before the first cross-process collective, as a crashed peer
would; the other processes go into the collective and are aborted by
``jax.distributed`` (see ``HEARTBEAT_TIMEOUT_S``).

Nothing runs at import (pytest's doctest collection imports this file).
"""

import os
import sys

import numpy as np

PER_DEVICE, HEIGHT, CHANNELS = 3, 2, 4
EPSILON, MOMENTUM = 1e-5, 0.9
# A process that stops sending heartbeats for this long is declared dead: the
# coordinator (process 0) then aborts every process, and if process 0 itself
# dies the others abort as soon as their connection to it drops. The abort is
# a C++ fatal error (SIGABRT) that Python cannot catch, so a peer that dies in
# a collective ends the survivors in about this long instead of hanging them.
HEARTBEAT_TIMEOUT_S = 10


def reference(x, scale, bias, g):
  """Batch norm of the global batch and ``d sum(g * y) / d (x, scale, bias)``."""
  x = x.astype(np.float64).reshape(-1, CHANNELS)
  g = g.astype(np.float64).reshape(-1, CHANNELS)
  n = x.shape[0]
  mean = x.mean(0)
  var = ((x - mean) ** 2).mean(0)
  inv = 1.0 / np.sqrt(var + EPSILON)
  xhat = (x - mean) * inv
  y = xhat * scale + bias
  dxhat = g * scale
  dx = inv * (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).sum(0) / n)
  return y, mean, var, dx, (g * xhat).sum(0), g.sum(0)


def main(process_id: int, num_processes: int, port: int, die: bool = False) -> None:
  import jax

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    f"127.0.0.1:{port}",
    num_processes=num_processes,
    process_id=process_id,
    # Every wait is bounded (seconds; JAX's defaults are 300, 100 and 300):
    # - initialization_timeout: how long initialize() waits for every process
    #   to join; if one never starts, the others abort (SIGABRT) after this.
    # - heartbeat_timeout_seconds: how long a process may miss heartbeats
    #   before it is declared dead and every process is aborted (SIGABRT).
    #   Too low and a process stalled by a loaded machine is declared dead.
    # - shutdown_timeout_seconds: how long jax.distributed.shutdown() waits
    #   at its barrier for the other processes.
    initialization_timeout=30,
    heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_seconds=10,
  )
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jaxnorm as jn

  assert jax.process_count() == num_processes, jax.process_count()
  devices = jax.devices()
  local = jax.local_device_count()
  rows = PER_DEVICE * local
  shape = (len(devices) * PER_DEVICE, HEIGHT, CHANNELS)

  rng = np.random.default_rng(0)
  # Each device's rows have their own offset and spread, so statistics that
  # stay per device or per process are far from the global ones.
  offset = np.repeat(np.arange(len(devices)), PER_DEVICE)[:, None, None]
  x = (rng.normal(size=shape) * (1.0 + 0.5 * offset) + 3.0 * offset).astype(np.float32)
  g = rng.normal(size=shape).astype(np.float32)
  scale = rng.uniform(0.5, 1.5, CHANNELS).astype(np.float32)
  bias = rng.normal(size=CHANNELS).astype(np.float32)
  y_ref, mean_ref, var_ref, dx_ref, dscale_ref, dbias_ref = reference(x, scale, bias, g)
  y_ref, dx_ref = y_ref.reshape(shape), dx_ref.reshape(shape)

  # Devices in process order: this process's rows are one contiguous block.
  mesh = Mesh(np.array(devices), ("batch",))
  sharded = NamedSharding(mesh, P("batch"))
  mine = slice(process_id * rows, (process_id + 1) * rows)
  x_global = jax.make_array_from_process_local_data(sharded, x[mine], shape)
  g_global = jax.make_array_from_process_local_data(sharded, g[mine], shape)
  params = jn.NormParams(jnp.asarray(scale), jnp.asarray(bias))
  _, state = jn.batch_norm_init(CHANNELS)

  def check_local(name, arr, ref, atol):
    for shard in arr.addressable_shards:
      np.testing.assert_allclose(
        np.asarray(shard.data), ref[shard.index], rtol=1e-4, atol=atol, err_msg=name
      )

  def bn(axis_name):
    def loss(x, params, g):
      y, new_state = jn.batch_norm(
        x,
        params,
        state,
        use_running_average=False,
        axis_name=axis_name,
        momentum=MOMENTUM,
        epsilon=EPSILON,
      )
      return jnp.sum(y * g), (y, new_state)

    return loss

  # 1. shard_map with axis_name: one psum across both processes.
  def shard_loss(x, params, g):
    local_loss, aux = bn("batch")(x, params, g)
    return jax.lax.psum(local_loss, "batch"), aux

  def shard_step(x, params, g):
    grads, (y, new_state) = jax.grad(shard_loss, argnums=(0, 1), has_aux=True)(
      x, params, g
    )
    return y, new_state, grads

  shard_step = jax.jit(
    jax.shard_map(
      shard_step,
      mesh=mesh,
      in_specs=(P("batch"), P(), P("batch")),
      out_specs=(P("batch"), P(), (P("batch"), P())),
    )
  )
  # 2. SPMD jit, no axis_name: the statistics of a sharded array are global.
  spmd_step = jax.jit(
    lambda x, params, g: jax.grad(bn(None), argnums=(0, 1), has_aux=True)(x, params, g)[
      ::-1
    ]
  )

  if die:
    print(f"process {process_id}: dying before the collective", flush=True)
    os._exit(1)  # no shutdown, no atexit: as a crash or a kill would
  print(f"process {process_id}: entering the collectives", flush=True)
  for name, step in (("shard_map", shard_step), ("jit", spmd_step)):
    if name == "shard_map":
      y, new_state, (dx, dparams) = step(x_global, params, g_global)
    else:
      (y, new_state), (dx, dparams) = step(x_global, params, g_global)
    check_local(f"{name} y", y, y_ref, 1e-4)
    check_local(f"{name} dx", dx, dx_ref, 1e-4)
    for got, ref, what in (
      (new_state.mean, (1 - MOMENTUM) * mean_ref, "mean"),
      (new_state.var, MOMENTUM + (1 - MOMENTUM) * var_ref, "var"),
      (dparams.scale, dscale_ref, "dscale"),
      (dparams.bias, dbias_ref, "dbias"),
    ):
      assert got.is_fully_replicated, (name, what, got.sharding)
      np.testing.assert_allclose(
        np.asarray(got.addressable_data(0)),
        ref,
        rtol=1e-4,
        atol=1e-4,
        err_msg=f"{name} {what}",
      )
    print(f"process {process_id}: {name} matches the global batch", flush=True)

  jax.distributed.shutdown()
  print(f"process {process_id}: OK", flush=True)


if __name__ == "__main__":
  main(
    int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), die="--die" in sys.argv[4:]
  )

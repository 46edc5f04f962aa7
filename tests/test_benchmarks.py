"""The benchmark suite and ``jaxnorm.benchmark``: outputs, not timings."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnorm as jn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")


def _load_run():
  if "bench_run" in sys.modules:
    return sys.modules["bench_run"]
  spec = importlib.util.spec_from_file_location("bench_run", RUN)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["bench_run"] = mod  # dataclasses look their module up here
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.slow
def test_quick_run_writes_json_markdown_and_png(tmp_path):
  out = tmp_path / "bench"
  proc = subprocess.run(
    [sys.executable, RUN, "--quick", "--dtypes", "float32", "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  result = json.loads((out / "results.json").read_text())
  meta, rows = result["meta"], result["rows"]
  assert meta["complete"] and meta["quick"]
  assert "xla_flags" in meta and meta["versions"]["jax"] == jax.__version__
  layers = {"bn", "ln", "rms", "gn", "in"}
  jrows = [r for r in rows if r["lib"] == "jaxnorm"]
  # 5 layers x 2 quick shapes x 1 dtype x 2 modes.
  assert len(jrows) == 20
  assert {r["layer"] for r in jrows} == layers
  assert {r["mode"] for r in jrows} == {"fwd", "fwd+bwd"}
  for r in rows:
    assert len(r["times_s"]) >= 3 and r["median_s"] > 0 and r["compile_s"] > 0
    assert r["median_s"] == sorted(r["times_s"])[len(r["times_s"]) // 2]
    if r["mode"] == "fwd+bwd":
      assert r["residual_over_x"] > 0
    else:
      assert r["residual_over_x"] is None
  for r in jrows:
    assert set(r["ratio"]) >= {"flax", "haiku"}
    f = next(
      q
      for q in rows
      if q["lib"] == "flax"
      and (q["layer"], q["shape_name"], q["mode"])
      == (r["layer"], r["shape_name"], r["mode"])
    )
    assert math.isclose(r["ratio"]["flax"], r["median_s"] / f["median_s"])
  # The equinox and jax.nn peers appear only where they apply.
  assert {r["layer"] for r in rows if r["lib"] == "equinox"} == {"ln", "rms"}
  assert {r["layer"] for r in rows if r["lib"] == "jax.nn"} == {"bn", "ln", "in"}

  md = (out / "results.md").read_text()
  assert md.startswith("# Benchmark results\n")  # a page of the docs site
  table = [ln for ln in md.splitlines() if ln.startswith("| ")]
  assert len(table) == 1 + 20  # header + one row per case
  assert "÷flax" in table[0] and "res/x" in table[0]
  assert all(ln.count("|") == table[0].count("|") for ln in table)
  assert "Geometric mean" in md

  png = (out / "ratios.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


@pytest.mark.slow
def test_quick_model_rows(tmp_path):
  """The whole-model rows alone, tiny: finite times and ratios, same losses."""
  out = tmp_path / "models"
  proc = subprocess.run(
    [sys.executable, RUN, "--quick", "--models-only", "--out", str(out)],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]

  result = json.loads((out / "results.json").read_text())
  meta, rows, mrows = result["meta"], result["rows"], result["model_rows"]
  assert meta["complete"] and meta["quick"] and rows == []
  assert set(meta["models"]) == {"mlp", "resnet"}
  # 2 models x 5 layers x 2 libraries.
  assert len(mrows) == 20
  assert {r["lib"] for r in mrows} == {"jaxnorm", "flax"}
  assert {r["layer"] for r in mrows} == {"bn", "ln", "rms", "gn", "in"}
  assert {r["kind"] for r in mrows} == {"mlp", "resnet"}
  by_case = {}
  for r in mrows:
    by_case.setdefault((r["model"], r["layer"]), {})[r["lib"]] = r
    assert len(r["times_s"]) >= 3
    assert r["median_s"] == sorted(r["times_s"])[len(r["times_s"]) // 2]
    for v in (r["median_s"], r["compile_s"], r["first_compile_s"], r["trace_s"]):
      assert math.isfinite(v) and v > 0
    assert math.isclose(
      r["compile_s"], r["trace_s"] + r["lower_s"] + r["xla_compile_s"]
    )
    assert math.isfinite(r["loss"])
  for libs in by_case.values():
    j, f = libs["jaxnorm"], libs["flax"]
    assert math.isclose(j["ratio"]["flax"], j["median_s"] / f["median_s"])
    assert math.isclose(j["compile_ratio"]["flax"], j["compile_s"] / f["compile_s"])
    assert math.isfinite(j["ratio"]["flax"]) and math.isfinite(f["ratio"]["jaxnorm"])
    # Same model, same variables, same batch: the same loss.
    assert j["loss_diff"]["flax"] <= 1e-4 * max(1.0, abs(f["loss"]))
  assert result["model_summary"]["rows"] == 10
  assert math.isfinite(result["model_summary"]["max_compile_ratio_vs_flax"])

  md = (out / "results.md").read_text()
  assert md.startswith("# Benchmark results\n")  # a page of the docs site
  table = [ln for ln in md.splitlines() if ln.startswith("| ")]
  assert len(table) == 1 + 10  # header + one row per (model, layer)
  assert "÷flax" in table[0] and "compile ÷flax" in table[0]
  assert all(ln.count("|") == table[0].count("|") for ln in table)
  assert "Whole models, jaxnorm ÷ flax" in md
  assert not (out / "ratios.png").exists()  # no single-layer rows to plot


def _load_models():
  return _load_run().load_models()


def test_model_configs_match_the_issue():
  models = _load_models()
  mlp, resnet = models.MODELS["mlp"], models.MODELS["resnet"]
  assert (mlp.kind, mlp.input_shape, mlp.blocks, mlp.features) == (
    "mlp",
    (32, 8, 8, 64),
    50,
    64,
  )
  assert mlp.norm_layers == 50 and mlp.groups == 32
  # Stem, two per block, and the projection of the downsampling block.
  assert resnet.norm_layers == 1 + 2 * 3 + 1 and resnet.groups == 32
  assert models.QUICK_MODELS["mlp"].groups == 16  # fewer groups than channels


def test_model_rows_and_markdown():
  """Rows, ratios and table of the whole models, from made-up entries."""
  models = _load_models()
  cfg = models.QUICK_MODELS["mlp"]
  entries = [
    models.ModelEntry(
      "jaxnorm", None, 1.0, (0.1, 0.1, 0.2), [(0.1, 0.1, 1.0)], [1e-3, 2e-3, 3e-3]
    ),
    models.ModelEntry(
      "flax", None, 1.5, (0.1, 0.1, 0.3), [(0.1, 0.1, 0.8)], [4e-3] * 3
    ),
  ]
  rows = models.build_rows("bn", cfg, entries)
  j, f = rows
  assert math.isclose(j["ratio"]["flax"], 0.5)
  assert math.isclose(j["compile_ratio"]["flax"], 1.2 / 1.0)
  assert math.isclose(j["loss_diff"]["flax"], 0.5)
  assert j["compile_times_s"] == [1.2] and math.isclose(j["first_compile_s"], 0.4)
  s = models.summary(rows)
  assert s["rows_over_step_limit"] == 0 and s["rows_over_compile_limit"] == 1
  md = models.markdown(rows, compile_reps=1)
  table = [ln for ln in md.splitlines() if ln.startswith("| ")]
  assert len(table) == 2 and "| 2.00 | 4.00 | 0.50 |" in table[1]
  # Without timed compilations the warm-up one is reported.
  for e in entries:
    e.compile_splits.clear()
  j = models.build_rows("bn", cfg, entries)[0]
  assert math.isclose(j["compile_ratio"]["flax"], 0.4 / 0.5)
  assert "first compilation" in models.markdown(rows, compile_reps=0)


def test_compulsory_bytes_and_peak_bandwidth():
  run = _load_run()
  shape, nx = (4, 8), 4 * 8 * 4
  assert run.compulsory_bytes("ln", "fwd", shape, jnp.float32) == 2 * nx
  assert run.compulsory_bytes("ln", "fwd+bwd", shape, jnp.float32) == 3 * nx
  assert run.compulsory_bytes("bn", "fwd+bwd", shape, jnp.float32) == 4 * nx
  assert run.compulsory_bytes("bn", "fwd", shape, jnp.bfloat16) == nx
  assert run.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
  assert run.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
  assert run.peak_bandwidth("NVIDIA H200") == 4.8e12
  assert run.peak_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
  assert run.peak_bandwidth("cpu") is None


def test_gpu_bandwidth_column():
  """The GPU path: achieved compulsory bandwidth over the device's peak."""
  run = _load_run()
  shape = (1000, 1000)  # 4 MB in float32
  entries = [
    run.Entry("jaxnorm", None, (), 0.1, 8e6, None, times=[1e-3, 2e-3, 3e-3]),
    run.Entry("flax", None, (), 0.1, 8e6, None, times=[4e-3] * 3),
  ]
  device = {"platform": "gpu", "device_kind": "NVIDIA H100", "peak_bandwidth_Bps": 4e9}
  rows = run.build_rows("ln", "t", shape, jnp.float32, "fwd", entries, device)
  j = rows[0]
  # 8 MB compulsory in 2 ms is 4 GB/s: all of the (made-up) 4 GB/s peak.
  assert math.isclose(j["bandwidth_fraction"], 1.0)
  assert math.isclose(j["ratio"]["flax"], 0.5)
  assert math.isclose(j["bytes_accessed_over_compulsory"], 1.0)
  meta = {
    "device": device,
    "machine": {"cpu": "x", "affinity": 1},
    "versions": {"jax": jax.__version__},
    "xla_flags": "",
    "reps": 3,
  }
  md = run.markdown(rows, meta)
  assert "% peak BW" in md and "| 100 |" in md


def test_benchmark_forward():
  x = jnp.ones((4, 16))
  r = jn.benchmark(jn.layer_norm, x, jn.layer_norm_init(16), reps=3)
  assert isinstance(r, jn.BenchmarkResult)
  assert r.mode == "fwd" and len(r.times_s) == 3
  assert r.median_s == sorted(r.times_s)[1]
  assert r.compile_s > 0 and r.residual_bytes is None


def test_benchmark_forward_backward_residuals():
  """jaxnorm keeps x and per-row statistics; flax's autodiff keeps more."""
  x = jax.random.normal(jax.random.key(0), (64, 32))
  params = jn.layer_norm_init(32)
  r = jn.benchmark(jn.layer_norm, x, params, mode="fwd+bwd", reps=2)
  assert r.mode == "fwd+bwd" and len(r.times_s) == 2
  # x, the shift, mean and variance per row, the parameters and the count.
  small = 3 * 64 * 4 + 2 * 32 * 4 + 4
  assert x.nbytes <= r.residual_bytes <= x.nbytes + small
  # Batch norm returns (y, state): the first element is what is timed.
  p, s = jn.batch_norm_init(32)
  bn = jn.benchmark(
    lambda x, p: jn.batch_norm(x, p, s, use_running_average=False),
    x,
    p,
    mode="fwd+bwd",
    reps=1,
    argnums=(0,),
  )
  assert bn.residual_bytes <= 1.1 * x.nbytes


def test_benchmark_bad_arguments():
  x = jnp.ones((2, 4))
  p = jn.layer_norm_init(4)
  with pytest.raises(ValueError, match="mode"):
    jn.benchmark(jn.layer_norm, x, p, mode="backward")
  with pytest.raises(ValueError, match="reps"):
    jn.benchmark(jn.layer_norm, x, p, reps=0)
  with pytest.raises(ValueError, match="args"):
    jn.benchmark(jn.layer_norm)
  with pytest.raises(TypeError, match="reps"):
    jn.benchmark(jn.layer_norm, x, p, reps=True)
  with pytest.raises(ValueError, match="argnums"):
    jn.benchmark(jn.layer_norm, x, p, mode="fwd+bwd", argnums=2)
  with pytest.raises(TypeError, match="argnums"):
    jn.benchmark(jn.layer_norm, x, p, mode="fwd+bwd", argnums="x")


def test_benchmark_numpy_reps_int_argnums_and_integer_state():
  x = jnp.ones((4, 8))
  r = jn.benchmark(jn.layer_norm, x, jn.layer_norm_init(8), reps=np.int64(2))
  assert len(r.times_s) == 2
  # One argnum as an int: only x is differentiated, so the backward pass
  # keeps x (4 x 8 float32) and per-row statistics, not the parameters'.
  r = jn.benchmark(jn.layer_norm, x, jn.layer_norm_init(8), mode="fwd+bwd", argnums=0)
  assert r.residual_bytes >= x.nbytes
  # Every argument, including a state with an integer num_batches_tracked.
  params, state = jn.batch_norm_init(8, running_stats="torch")

  def bn(x, params, state):
    return jn.batch_norm(
      x, params, state, use_running_average=False, running_stats="torch", momentum=0.1
    )

  r = jn.benchmark(bn, x, params, state, mode="fwd+bwd", reps=1)
  assert r.median_s > 0


def _load_sync_bn():
  path = os.path.join(ROOT, "benchmarks", "sync_bn.py")
  spec = importlib.util.spec_from_file_location("bench_sync_bn", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_sync_bn_counts_collectives_in_hlo_text():
  sync_bn = _load_sync_bn()
  hlo = "\n".join(
    [
      "  %a = f32[8,3,32]{2,1,0} all-reduce(%x), channel_id=1, to_apply=%add",
      "  %b = (f32[32]{0}, f32[]) all-reduce(%y, %z), channel_id=2, to_apply=%add",
      "  %c = f32[64]{0} all-gather-start(%w), dimensions={0}",
      "  %d = f32[64]{0} all-gather-done(%c)",
      "  %e = f32[32]{0} add(%a, %b)",
    ]
  )
  assert sync_bn.collectives(hlo) == {"all-reduce": 2, "all-gather": 1}
  assert sync_bn.all_reduce_bytes(hlo) == (8 * 3 * 32 + 32 + 1) * 4


@pytest.mark.slow
def test_sync_bn_script_runs(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "benchmarks", "sync_bn.py"),
      "--shape",
      "16,4,4,8",
      "--reps",
      "2",
      "--out",
      str(tmp_path),
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=ROOT,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((tmp_path / "sync_bn.json").read_text())
  assert result["meta"]["devices"] == 8
  # jaxnorm's update equals flax's: both compute exact global statistics.
  assert result["meta"]["max_abs_diff_jaxnorm_vs_flax"] < 1e-5
  by_lib = {r["lib"]: r for r in result["rows"]}
  assert set(by_lib) == {"jaxnorm", "flax"}
  for r in by_lib.values():
    assert r["collectives"].get("all-reduce", 0) >= 1
    assert len(r["times_s"]) == 2
  sync_md = (tmp_path / "sync_bn.md").read_text()
  assert sync_md.startswith("# Sync BN training step\n")  # a page of the docs site
  assert "all-reduces per step" in sync_md

"""Test configuration: 8 simulated CPU devices, set before jax is imported.

Setting ``XLA_FLAGS`` inside a test module fails silently once another module
has imported jax, so it lives here, where pytest reads it first.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py must run before jax is imported"

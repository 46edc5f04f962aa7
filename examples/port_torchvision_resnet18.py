"""Port torchvision's ResNet-18 to a flax.linen ResNet with jaxnorm's BatchNorm.

The torch model has random weights (``weights=None``: nothing is
downloaded). Its batch-norm running statistics are first given realistic,
non-trivial values by a few training-mode passes over random images, and its
BN affine parameters are randomized, so that evaluation exercises every
ported number. The JAX model runs in NHWC:

* convolutions: torch's ``(out, in, kh, kw)`` (OIHW) kernels become flax's
  ``(kh, kw, in, out)`` (HWIO), with torch's symmetric padding spelled out;
* batch norm: :func:`jaxnorm.from_torch_state_dict` turns every
  ``BatchNorm2d`` into the ``params``/``batch_stats`` of a
  ``jaxnorm.linen.BatchNorm`` (the running variance is copied as it is:
  evaluation uses it unchanged in both libraries);
* the classifier: ``fc.weight`` ``(out, in)`` is transposed to flax's
  ``Dense`` kernel ``(in, out)``.

It prints the largest absolute difference of the logits (asserted to be at
most 1e-4) and the median time of torch's evaluation forward and of the
jitted JAX forward, both on CPU.

Run::

    python examples/port_torchvision_resnet18.py          # 224x224, batch 4
    python examples/port_torchvision_resnet18.py --quick  # [1, 1, 1, 1] blocks, 32x32
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torchvision
from torchvision.models.resnet import BasicBlock, ResNet

import jaxnorm as jn
import jaxnorm.linen as jnn

TOLERANCE = 1e-4


class Block(nn.Module):
  """torchvision's ``BasicBlock``: two 3x3 convolutions and a shortcut."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = (self.stride, self.stride)
    pad = ((1, 1), (1, 1))
    bn = lambda name: jnn.BatchNorm(use_running_average=True, epsilon=1e-5, name=name)
    y = nn.Conv(self.features, (3, 3), s, pad, use_bias=False, name="conv1")(x)
    y = nn.relu(bn("bn1")(y))
    y = nn.Conv(self.features, (3, 3), (1, 1), pad, use_bias=False, name="conv2")(y)
    y = bn("bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), s, "VALID", use_bias=False, name="down_conv")(
        x
      )
      x = bn("down_bn")(x)
    return nn.relu(y + x)


class ResNetNHWC(nn.Module):
  """ResNet with ``BasicBlock`` stages, NHWC, evaluation mode only."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 1000

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(64, (7, 7), (2, 2), ((3, 3), (3, 3)), use_bias=False, name="conv1")(x)
    x = jnn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn1")(x)
    x = nn.relu(x)
    # torch pads max pooling with -inf as flax does.
    x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = Block(64 * 2**i, stride, name=f"layer{i + 1}_{j}")(x)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


def flax_path(torch_name: str) -> tuple[str, ...]:
  """``layer1.0.downsample.1`` -> ``("layer1_0", "down_bn")``."""
  parts = torch_name.split(".")
  if parts[0].startswith("layer"):
    parts = [f"{parts[0]}_{parts[1]}", *parts[2:]]
  if parts[-2:] == ["downsample", "0"]:
    parts = [*parts[:-2], "down_conv"]
  elif parts[-2:] == ["downsample", "1"]:
    parts = [*parts[:-2], "down_bn"]
  return tuple(parts)


def _put(tree: dict, path: tuple[str, ...], leaf: dict) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree.setdefault(path[-1], {}).update(leaf)


def port(model: torch.nn.Module) -> dict:
  """flax variables of :class:`ResNetNHWC` from a torchvision ResNet."""
  state_dict = model.state_dict()
  variables = {"params": {}, "batch_stats": {}}
  for name, module in model.named_modules():
    if not isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)):
      continue  # containers, activations and pooling hold no weights
    path = flax_path(name)
    if isinstance(module, torch.nn.Conv2d):
      w = module.weight.detach().cpu().numpy()
      _put(variables["params"], path, {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0))})
    elif isinstance(module, torch.nn.BatchNorm2d):
      bn = jn.from_torch_state_dict(state_dict, module, prefix=name, to="flax")
      for collection, leaves in bn.items():
        _put(variables[collection], path, leaves)
    elif isinstance(module, torch.nn.Linear):
      w = module.weight.detach().cpu().numpy()
      b = module.bias.detach().cpu().numpy()
      _put(
        variables["params"],
        path,
        {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)},
      )
  return variables


def make_torch_model(stage_sizes: Sequence[int], size: int, seed: int = 0):
  """A random torchvision ResNet in eval mode with non-trivial BN statistics."""
  torch.manual_seed(seed)
  if tuple(stage_sizes) == (2, 2, 2, 2):
    model = torchvision.models.resnet18(weights=None)
  else:
    model = ResNet(BasicBlock, list(stage_sizes))
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0.0, 0.2)
        module.momentum = None  # cumulative average over the passes below
    # Training-mode passes on shifted, scaled noise: running means away from
    # 0 and (unbiased) running variances away from 1, different per channel.
    model.train()
    for _ in range(3):
      model(torch.randn(4, 3, size, size) * 2.0 + 0.5)
  return model.eval()


def median_time(fn, repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls, after one warm-up."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def main(quick: bool = False, batch: int = 4, repeats: int = 5) -> float:
  """Ports, compares and times; returns the max absolute logit difference."""
  torch.set_num_threads(2)
  stage_sizes, size = ((1, 1, 1, 1), 32) if quick else ((2, 2, 2, 2), 224)
  model = make_torch_model(stage_sizes, size)
  x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))

  variables = port(model)
  flax_model = ResNetNHWC(stage_sizes)
  expected = jax.eval_shape(
    flax_model.init, jax.random.key(0), jnp.zeros((1, size, size, 3))
  )
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  assert shapes(variables) == shapes(expected), "ported variables do not fit the model"

  x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
  forward = jax.jit(flax_model.apply)
  logits_jax = np.asarray(forward(variables, x_nhwc))
  with torch.inference_mode():
    logits_torch = model(x).numpy()
  diff = float(np.max(np.abs(logits_jax - logits_torch)))

  def run_torch():
    with torch.inference_mode():
      model(x)

  t_torch = median_time(run_torch, repeats)
  t_jax = median_time(lambda: forward(variables, x_nhwc).block_until_ready(), repeats)
  name = "ResNet[1, 1, 1, 1]" if quick else "ResNet-18"
  print(f"{name}, input {batch}x3x{size}x{size}, logits {logits_torch.shape}")
  print(
    f"max |logits diff| torch vs JAX: {diff:.2e} (logits std {logits_torch.std():.2f})"
  )
  print(f"torch eval forward:  {t_torch * 1e3:8.1f} ms (median of {repeats})")
  print(f"jitted JAX forward:  {t_jax * 1e3:8.1f} ms (median of {repeats})")
  assert diff <= TOLERANCE, f"logits differ by {diff} > {TOLERANCE}"
  return diff


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small model and input")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  main(quick=args.quick, batch=args.batch, repeats=args.repeats)

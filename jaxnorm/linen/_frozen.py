"""linen frozen BN (placeholder; being written)."""


class FrozenBatchNorm:
  """Placeholder."""


def freeze_batch_norm(*args, **kwargs):
  """Placeholder."""
  raise NotImplementedError


def unfreeze_batch_norm(*args, **kwargs):
  """Placeholder."""
  raise NotImplementedError

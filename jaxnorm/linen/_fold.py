"""linen BN folding (placeholder; being written)."""


def fold_batch_norm(*args, **kwargs):
  """Placeholder."""
  raise NotImplementedError

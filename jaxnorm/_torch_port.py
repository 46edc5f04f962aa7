"""PyTorch state_dict converter (placeholder; being written)."""


def from_torch_state_dict(*args, **kwargs):
  """Placeholder."""
  raise NotImplementedError

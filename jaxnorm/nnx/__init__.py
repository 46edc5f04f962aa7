"""flax.nnx modules: drop-in replacements for flax's normalization layers.

Every module holds no maths: it creates nnx variables and calls the
functional core in :mod:`jaxnorm`.
"""

# Re-exports only. Each family lives in a private module of this package.

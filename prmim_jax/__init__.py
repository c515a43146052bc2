"""prmim_jax: PR-MIM (partial + progressive reconstruction for masked image modeling) in JAX/Flax."""

__version__ = "0.1.0"

"""r1jax: DeepSeek-V3 / R1 in JAX. See README.md for the layout and the public API."""

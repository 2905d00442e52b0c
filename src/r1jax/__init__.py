"""r1jax: DeepSeek-V3 / R1 in JAX. docs/architecture.md draws the package layout; docs/usage.md the public API."""

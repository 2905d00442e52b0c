"""Benchmarks (`r1jax bench ...`) with JSON output: each reports what it measured, the physical bound it is
compared with and how that bound was obtained. They import the library's public functions; nothing in the
library imports them, and no test asserts a speed."""

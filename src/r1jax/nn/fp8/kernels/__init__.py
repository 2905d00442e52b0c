"""The block-scaled FP8 GEMM primitive by backend (xla: the reference formulation; mosaic_gpu, triton,
mosaic_tpu: Pallas kernels), the one-pass Triton quantiser, and what the kernels share (util)."""

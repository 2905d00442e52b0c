"""DeepSeek-V3's fine-grained FP8 recipe (V3 report §3.3) as one package: quantize (the e4m3 tiles, the
reference), gemm (the one block-scaled GEMM primitive and which implementation runs it), operands (the tiles
each GEMM reads), tiles (weights quantised ahead), dot and mlp (the custom_vjps), ragged (the grouped form),
weights (kept-FP8 checkpoints for inference), experts (the routed experts' FFN); kernels/ beneath them.
Callers pass an FP8Config (or its block, impl and pow2 fields) down and read nothing else; this face only
hands names on."""

from r1jax.nn.fp8 import experts, ragged, weights
from r1jax.nn.fp8.dot import BATCHED_NAMES, SAVED_NAMES, WEIGHT_NAME, batched_dot, batched_dots, dot, dots
from r1jax.nn.fp8.gemm import KERNELS, Impl, gemm_nt, joins_columns, resolve_impl, weight_nt
from r1jax.nn.fp8.mlp import batched_swiglu_mlp, swiglu_mlp
from r1jax.nn.fp8.operands import quantize_input, quantize_swiglu
from r1jax.nn.fp8.quantize import (
                                   AMAX_FLOOR,
                                   E4M3,
                                   E4M3_MAX,
                                   dequantize_act,
                                   dequantize_weight,
                                   quantize_act,
                                   quantize_weight,
                                   swiglu,
                                   swiglu_grad,
                                   tile_scale,
)
from r1jax.nn.fp8.tiles import WeightTiles, weight_tiles

__all__ = ["AMAX_FLOOR", "BATCHED_NAMES", "E4M3", "E4M3_MAX", "Impl", "KERNELS", "SAVED_NAMES", "WEIGHT_NAME",
           "WeightTiles", "batched_dot", "batched_dots", "batched_swiglu_mlp", "dequantize_act", "dequantize_weight",
           "dot", "dots", "gemm_nt", "joins_columns", "quantize_act", "quantize_input", "quantize_swiglu",
           "quantize_weight", "ragged", "experts", "resolve_impl", "swiglu", "swiglu_grad", "swiglu_mlp", "tile_scale",
           "weight_nt", "weight_tiles", "weights"]

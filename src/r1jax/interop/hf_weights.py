"""Where each r1jax parameter lives in a Hugging Face checkpoint, and how it is laid out there.

HF stores linear weights as [out, in] (r1jax: [in, out] for x @ W), one tensor per layer and per expert
(r1jax: stacked on leading layer/expert axes), with DeepSeek's MTP modules as extra layers after
num_hidden_layers, and (DeepSeek V3/R1) FP8 weights with one `weight_scale_inv` per 128x128 block."""

from __future__ import annotations

import dataclasses
import logging

import jax
import ml_dtypes
import numpy as np

from r1jax.config import ModelConfig
from r1jax.interop.hf_config import V2, HFInfo
from r1jax.nn import layers

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint that does not match its config; the message names the tensor."""


_BLOCK = {  # block-relative r1jax path -> HF name suffix; {e} is the expert index
    "attn_norm": "input_layernorm.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "attn/wq_a": "self_attn.q_a_proj.weight",
    "attn/q_norm": "self_attn.q_a_layernorm.weight",
    "attn/wq_b": "self_attn.q_b_proj.weight",
    "attn/wq": "self_attn.q_proj.weight",
    "attn/wkv_a": "self_attn.kv_a_proj_with_mqa.weight",
    "attn/kv_norm": "self_attn.kv_a_layernorm.weight",
    "attn/wkv_b": "self_attn.kv_b_proj.weight",
    "attn/wk": "self_attn.k_proj.weight",
    "attn/wv": "self_attn.v_proj.weight",
    "attn/wo": "self_attn.o_proj.weight",
    "attn/bq": "self_attn.q_proj.bias",
    "attn/bk": "self_attn.k_proj.bias",
    "attn/bv": "self_attn.v_proj.bias",
    "ffn/w_gate": "mlp.gate_proj.weight",
    "ffn/w_up": "mlp.up_proj.weight",
    "ffn/w_down": "mlp.down_proj.weight",
    "ffn/router/w": "mlp.gate.weight",
    "ffn/router/bias": "mlp.gate.e_score_correction_bias",  # V3's aux-loss-free selection bias
    "ffn/experts/w_gate": "mlp.experts.{e}.gate_proj.weight",
    "ffn/experts/w_up": "mlp.experts.{e}.up_proj.weight",
    "ffn/experts/w_down": "mlp.experts.{e}.down_proj.weight",
    "ffn/shared/w_gate": "mlp.shared_experts.gate_proj.weight",
    "ffn/shared/w_up": "mlp.shared_experts.up_proj.weight",
    "ffn/shared/w_down": "mlp.shared_experts.down_proj.weight",
}
_MTP = {"enorm": "enorm.weight", "hnorm": "hnorm.weight", "proj": "eh_proj.weight", "norm": "shared_head.norm.weight"}
_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "head": "lm_head.weight"}
# DeepSeek's MTP layers also carry copies of the shared embedding and output head.
MTP_COPIES = {"embed_tokens.weight": "embed", "shared_head.head.weight": "head"}


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One r1jax parameter: its HF tensors are `template` formatted per (layer, expert) of its leading axes."""

  path: tuple[str, ...]
  shape: tuple[int, ...]
  dtype: np.dtype
  template: str | None  # None: the architecture has no such tensor (r1jax holds zeros)
  layers: tuple[int, ...] | None = None  # HF layer index of each entry of a leading "layers" axis
  n_experts: int | None = None  # size of a leading experts axis (after the layers axis)
  matrix: bool = False  # HF [out, in] <-> r1jax [in, out]
  rope_cols: np.ndarray | None = None  # column permutation HF -> r1jax (rotate-half -> interleaved MLA RoPE)

  @property
  def n_lead(self) -> int:
    return (self.layers is not None) + (self.n_experts is not None)

  @property
  def piece_shape(self) -> tuple[int, ...]:
    """Shape of one HF tensor in r1jax's layout."""
    return self.shape[self.n_lead:]

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return self.piece_shape[::-1] if self.matrix else self.piece_shape

  def indices(self):
    """(layer, expert) pairs in the order of the leading axes; None where an axis is absent."""
    for layer in self.layers if self.layers is not None else [None]:
      for e in range(self.n_experts) if self.n_experts is not None else [None]:
        yield layer, e

  def name(self, layer, e) -> str:
    return self.template.format(layer=layer, e=e)


def _interleave_perm(n_rope: int) -> np.ndarray:
  """r1jax's interleaved rope column 2i <- HF column i, 2i+1 <- i + n/2 (same q.k, same rotation pairs)."""
  half = np.arange(n_rope // 2)
  return np.stack([half, half + n_rope // 2], axis=-1).reshape(-1)


def _rope_cols(rel: str, cfg: ModelConfig) -> np.ndarray | None:
  nope, rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
  perm = _interleave_perm(rope)
  if rel in ("attn/wq", "attn/wq_b"):
    per_head = np.concatenate([np.arange(nope), nope + perm])
    return (np.arange(cfg.n_heads)[:, None] * (nope + rope) + per_head).reshape(-1)
  if rel == "attn/wkv_a":
    return np.concatenate([np.arange(cfg.kv_lora_rank), cfg.kv_lora_rank + perm])
  return None


def _block_leaf(path, rel: str, value, cfg: ModelConfig, info: HFInfo, hf_layers) -> Leaf:
  if rel not in _BLOCK:
    raise KeyError(f"r1jax parameter {'/'.join(path)} has no Hugging Face name")
  template = f"model.layers.{{layer}}.{_BLOCK[rel]}"
  if rel == "ffn/router/bias" and info.arch == V2:
    template = None  # V2 routes without a selection bias
  n_experts = cfg.n_routed_experts if "/experts/" in rel else None
  piece_ndim = value.ndim - 1 - (n_experts is not None)
  rope = None
  if cfg.attention == "mla" and not info.rope_interleave:
    rope = _rope_cols(rel, cfg)
  return Leaf(path, value.shape, np.dtype(value.dtype), template, tuple(hf_layers), n_experts, piece_ndim == 2, rope)


def plan(cfg: ModelConfig, abstract: dict, info: HFInfo) -> list[Leaf]:
  """One Leaf per r1jax parameter, in tree-flattening order of `abstract` (model.abstract(cfg))."""
  stacks = {"dense_layers": range(0, cfg.n_dense_layers), "moe_layers": range(cfg.n_dense_layers, cfg.n_layers),
            "mtp": range(cfg.n_layers, cfg.n_layers + cfg.n_mtp)}
  leaves = []
  for key_path, p in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=layers.is_param)[0]:
    path = tuple(k.key for k in key_path)
    value = p.value
    if path[0] in _TOP:
      leaves.append(Leaf(path, value.shape, np.dtype(value.dtype), _TOP[path[0]], matrix=path[0] == "head"))
    elif path[0] == "mtp" and path[1] != "block":
      rel = "/".join(path[1:])
      leaves.append(Leaf(path, value.shape, np.dtype(value.dtype), f"model.layers.{{layer}}.{_MTP[rel]}",
                         tuple(stacks["mtp"]), matrix=value.ndim == 3))
    else:
      rel = "/".join(path[2:] if path[0] == "mtp" else path[1:])
      leaves.append(_block_leaf(path, rel, value, cfg, info, stacks[path[0]]))
  return leaves


def scale_name(name: str) -> str:
  return name[:-len("weight")] + "weight_scale_inv"


def dequantize(w_fp8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], name: str = "") -> np.ndarray:
  """float32 weights from FP8 ones times one scale per [block[0], block[1]] tile (edge tiles are partial)."""
  (rows, cols), (br, bc) = w_fp8.shape, block
  nr, nc = -(-rows // br), -(-cols // bc)
  if scale_inv.shape != (nr, nc):
    raise CheckpointError(f"tensor {scale_name(name)}: shape {list(scale_inv.shape)}, expected [{nr}, {nc}] for "
                          f"{list(w_fp8.shape)} weights in {br}x{bc} blocks")
  padded = np.zeros((nr * br, nc * bc), np.float32)
  padded[:rows, :cols] = w_fp8.astype(np.float32)
  tiles = padded.reshape(nr, br, nc, bc) * scale_inv.astype(np.float32)[:, None, :, None]
  return tiles.reshape(nr * br, nc * bc)[:rows, :cols]


def read_tensor(ckpt, name: str, info: HFInfo) -> np.ndarray:
  """One HF tensor as float32 (FP8 ones dequantised), at full size."""
  t = ckpt.get(name)
  scale = scale_name(name) if name.endswith("weight") else None
  if t.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
    if scale not in ckpt or info.fp8_block is None:
      raise CheckpointError(f"tensor {name} is FP8 but has no {scale} (or config.json no quantization_config)")
    return dequantize(t, ckpt.get(scale), info.fp8_block, name)
  if scale is not None and scale in ckpt:
    raise CheckpointError(f"tensor {scale} scales {name}, which is {ckpt.dtype(name)}, not F8_E4M3")
  return t.astype(np.float32)


def to_r1jax(leaf: Leaf, t: np.ndarray) -> np.ndarray:
  """An HF tensor (float32) in r1jax's layout for `leaf`, before the dtype cast."""
  if leaf.matrix:
    t = t.T
  if leaf.rope_cols is not None:
    t = t[..., leaf.rope_cols]
  return t


def to_hf(leaf: Leaf, piece: np.ndarray) -> np.ndarray:
  """Inverse of to_r1jax (export always writes interleaved MLA RoPE, so no permutation here)."""
  return np.ascontiguousarray(piece.T if leaf.matrix else piece)


def expected(leaves: list[Leaf]) -> dict[str, tuple[int, ...]]:
  """Every HF tensor name the params need, with its HF shape."""
  out = {}
  for leaf in leaves:
    if leaf.template is not None:
      out.update({leaf.name(layer, e): leaf.hf_shape for layer, e in leaf.indices()})
  return out


def check(ckpt, leaves: list[Leaf], cfg: ModelConfig, info: HFInfo) -> set[str]:
  """Fail on missing, unexpected or mis-shaped tensors; returns the names present but deliberately not read."""
  want = expected(leaves)
  problems, not_read, skipped_found = [], set(), False
  for name, shape in want.items():
    if name not in ckpt:
      problems.append(f"missing tensor {name} (expected shape {list(shape)})")
    elif ckpt.shape(name) != shape:
      problems.append(f"tensor {name}: shape {list(ckpt.shape(name))} in the checkpoint, expected {list(shape)} "
                      "from config.json")
  mtp_first = cfg.n_layers + cfg.n_mtp
  skipped_mtp = [f"model.layers.{i}." for i in range(mtp_first, cfg.n_layers + info.n_mtp)]
  copies = [f"model.layers.{i}.{c}" for i in range(cfg.n_layers, mtp_first) for c in MTP_COPIES]
  for name in ckpt.keys():
    if name in want:
      continue
    if name.endswith("weight_scale_inv") and name[:-len("_scale_inv")] in want:
      continue
    if any(name.startswith(prefix) for prefix in skipped_mtp):
      not_read.add(name)
      skipped_found = True
    elif name in copies:
      not_read.add(name)
    elif name == _TOP["head"] and cfg.tie_embeddings:
      not_read.add(name)  # checked against the embedding by the caller
    elif name.endswith("rotary_emb.inv_freq"):
      not_read.add(name)  # a cached buffer some old exports contain; recomputed from the config
    else:
      problems.append(f"unexpected tensor {name} (shape {list(ckpt.shape(name))}): config.json does not account "
                      "for it")
  if problems:
    more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise CheckpointError(problems[0] + more)
  if skipped_found:
    log.warning("not importing MTP layers %s (model.n_mtp=%d < %d declared by config.json)",
                ", ".join(p + "*" for p in skipped_mtp), cfg.n_mtp, info.n_mtp)
  if copies:
    log.info("MTP layers' embed_tokens/shared_head.head are copies of the shared embedding/head; not read")
  return not_read


def reader(ckpt, leaf: Leaf, info: HFInfo, tensor=None):
  """Callback for jax.make_array_from_callback: the r1jax slice `index` of `leaf`, read tensor by tensor;
  `tensor(name)` is one HF tensor in r1jax's layout (default: float32, FP8 dequantised)."""
  tensor = tensor or (lambda name: to_r1jax(leaf, read_tensor(ckpt, name, info)))
  cache = {}

  def read(index) -> np.ndarray:
    index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
    key = tuple(s.indices(n) for s, n in zip(index, leaf.shape))
    if key in cache:  # devices holding the same shard (replicas) share one read
      return cache[key]
    lead, inner = index[:leaf.n_lead], index[leaf.n_lead:]
    layer_ids = leaf.layers if leaf.layers is not None else [None]
    expert_ids = range(leaf.n_experts) if leaf.n_experts is not None else [None]
    if leaf.layers is not None:
      layer_ids = layer_ids[lead[0]]
    if leaf.n_experts is not None:
      expert_ids = expert_ids[lead[-1]]
    pieces = []
    for layer in layer_ids:
      for e in expert_ids:
        if leaf.template is None:
          piece = np.zeros(leaf.piece_shape, np.float32)
        else:
          piece = tensor(leaf.name(layer, e))
        pieces.append(piece[inner].astype(leaf.dtype))
    out_shape = [len(layer_ids)] * (leaf.layers is not None) + [len(expert_ids)] * (leaf.n_experts is not None)
    cache[key] = np.stack(pieces).reshape(*out_shape, *pieces[0].shape)
    return cache[key]

  return read


E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def is_fp8(ckpt, leaf: Leaf) -> bool:
  """Every HF tensor of `leaf` is stored as e4m3 (header only; nothing is read)."""
  return leaf.template is not None and all(ckpt.dtype(leaf.name(*i)) == "F8_E4M3" for i in leaf.indices())


def fp8_misfit(leaf: Leaf, info: HFInfo, block: int) -> str | None:
  """Why the checkpoint's e4m3 tiles of `leaf` cannot serve as r1jax's block x block weight tiles, or None."""
  if info.fp8_block is None:
    return "config.json has no quantization_config"
  if info.fp8_block != (block, block):
    return f"checkpoint blocks {info.fp8_block[0]}x{info.fp8_block[1]} differ from compute.fp8.block={block}"
  if not leaf.matrix or leaf.piece_shape[0] % block:  # a partial last block of output columns is kept
    return f"input dim {leaf.piece_shape[0] if leaf.matrix else list(leaf.piece_shape)} is not whole {block}-blocks"
  cols = leaf.rope_cols
  if cols is not None and np.any(cols // block != np.arange(len(cols)) // block):
    return "its RoPE column permutation crosses blocks"
  return None


def fp8_leaves(leaf: Leaf, block: int) -> tuple[Leaf, Leaf]:
  """A kept FP8 leaf as two: its e4m3 values and its fp32 block scales [..., K / block, ceil(N / block)]."""
  lead, (K, N) = leaf.shape[:leaf.n_lead], leaf.piece_shape
  return (dataclasses.replace(leaf, dtype=E4M3),
          dataclasses.replace(leaf, shape=(*lead, K // block, -(-N // block)), dtype=np.dtype(np.float32),
                              rope_cols=None))


def e4m3_tensor(ckpt, leaf: Leaf):
  """`reader`'s tensor(name) for the e4m3 values of a kept leaf: the checkpoint's bytes in r1jax's layout."""
  def read(name: str) -> np.ndarray:
    t = ckpt.get(name)
    if t.dtype != E4M3:
      raise CheckpointError(f"tensor {name} is {ckpt.dtype(name)}, not F8_E4M3 like the other tensors of its layers")
    return to_r1jax(leaf, t)
  return read


def scale_tensor(ckpt, scale_leaf: Leaf):
  """`reader`'s tensor(name) for the block scales of a kept leaf: `weight_scale_inv` [out/b, in/b], transposed."""
  def read(name: str) -> np.ndarray:
    scale, want = scale_name(name), scale_leaf.piece_shape[::-1]
    if scale not in ckpt:
      raise CheckpointError(f"tensor {name} is FP8 but has no {scale}")
    if ckpt.shape(scale) != want:
      raise CheckpointError(f"tensor {scale}: shape {list(ckpt.shape(scale))}, expected {list(want)}")
    return ckpt.get(scale).astype(np.float32).T
  return read

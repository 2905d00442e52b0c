"""The peer for `r1jax bench`: HF transformers' DeepseekV3ForCausalLM built from the same r1jax config (random
weights, bf16, PyTorch eager), timed on the same GPU in the same call. Not part of the package; needs torch
and transformers. Prints one JSON line.

  PYTHONPATH=src python bench/hf_peer.py sampler --config configs/bench_gpu.yaml --batch 64 --prompt-len 64 \
      --new-tokens 256
  PYTHONPATH=src python bench/hf_peer.py train --config configs/bench_gpu.yaml   # train.batch_size x seq_len
"""

import argparse
import json
import statistics
import time

import torch
import transformers

from r1jax import config
from r1jax.interop import hf_config


def build(cfg_path: str, overrides, train: bool = False):
  run = config.load(cfg_path, overrides)
  cfg = run.model
  raw = hf_config.to_hf(cfg, run.compute, "DeepseekV3ForCausalLM", "bfloat16")
  hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in raw.items() if k != "model_type"})
  torch.set_default_dtype(torch.bfloat16)
  with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
  return cfg, model.train() if train else model.eval()


@torch.inference_mode()
def sampler(args):
  cfg, model = build(args.config, args.overrides)
  ids = torch.randint(3, cfg.vocab_size, (args.batch, args.prompt_len), device="cuda")
  kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=0)
  model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
  times = []
  for _ in range(args.repeats):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
  new = out.shape[1] - ids.shape[1]
  seconds = statistics.median(times)
  return {"bench": "sampler", "peer": f"transformers {transformers.__version__} DeepseekV3ForCausalLM eager sdpa",
          "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": new, "seconds_all": times,
          "tokens_per_s": args.batch * new / seconds, "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def train(args):
  """Training steps as HF users run them: bf16 weights, fused AdamW, labels -> loss -> backward -> step.
  HF's DeepseekV3 has no MTP module: compare with r1jax at model.n_mtp=0."""
  cfg, model = build(args.config, args.overrides, train=True)
  run = config.load(args.config, args.overrides).train
  B, L = run.batch_size, run.seq_len
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
  ids = torch.randint(3, cfg.vocab_size, (B, L), device="cuda")
  times, losses = [], []
  for i in range(args.warmup + args.steps):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    if i >= args.warmup:
      times.append(time.perf_counter() - t0)
    losses.append(loss.item())
  seconds = statistics.median(times)
  return {"bench": "train", "peer": f"transformers {transformers.__version__} DeepseekV3ForCausalLM eager sdpa, "
          f"torch {torch.__version__}, bf16 weights, fused AdamW", "batch": B, "seq_len": L, "step_s_median": seconds,
          "step_s_all": times, "tokens_per_s": B * L / seconds, "losses": losses,
          "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=["sampler", "train"])
  parser.add_argument("--config", default="configs/bench_gpu.yaml")
  parser.add_argument("overrides", nargs="*")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--steps", type=int, default=10, help="train: timed steps")
  parser.add_argument("--warmup", type=int, default=2, help="train: untimed first steps")
  args = parser.parse_args()
  print(json.dumps({"sampler": sampler, "train": train}[args.what](args)))


if __name__ == "__main__":
  main()

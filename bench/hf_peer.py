"""The peer for `r1jax bench`: HF transformers' DeepseekV3ForCausalLM built from the same r1jax config (random
weights, bf16, PyTorch eager), timed on the same GPU in the same call. Not part of the package; needs torch
and transformers. Prints one JSON line.

  PYTHONPATH=src python bench/hf_peer.py sampler --config configs/bench_gpu.yaml --batch 64 --prompt-len 64 \
      --new-tokens 256
"""

import argparse
import json
import statistics
import time

import torch
import transformers

from r1jax import config
from r1jax.interop import hf_config


def build(cfg_path: str, overrides):
  cfg = config.load(cfg_path, overrides).model
  raw = hf_config.to_hf(cfg, "DeepseekV3ForCausalLM", "bfloat16")
  hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in raw.items() if k != "model_type"})
  torch.set_default_dtype(torch.bfloat16)
  with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa")
  return cfg, model.eval()


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


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("what", choices=["sampler"])
  parser.add_argument("--config", default="configs/bench_gpu.yaml")
  parser.add_argument("overrides", nargs="*")
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  print(json.dumps({"sampler": sampler}[args.what](args)))


if __name__ == "__main__":
  main()

#!/usr/bin/env python3
"""transformers' generation throughput, beside burnish's (`cargo bench --bench generate_tokens`).

    pip install torch transformers
    python benches/torch_generate_tokens.py --preset fixture --batch 1 --threads 2
    python benches/torch_generate_tokens.py --preset 17m --batch 16 --threads 2

Builds a LlamaForCausalLM of the preset's shape (the shapes of benches/torch_train_tokens.py;
random float32 weights, no download), and times `generate` with its KV cache: greedy, 32-token
random prompts (all one length, so no padding), 128 new tokens with no end-of-sequence id
(`min_new_tokens` = `max_new_tokens`), after one untimed run; --rounds timed runs. Prints one
JSON line with the median seconds and tokens_per_s = batch * 128 / median seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "fixture": dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    "17m": dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                num_attention_heads=6, num_key_value_heads=6),
}
PROMPT, NEW = 32, 128


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=SHAPES, default="fixture")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.preset], max_position_embeddings=PROMPT + NEW,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, PROMPT))

    def once() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                                 eos_token_id=None)
        assert out.shape == (args.batch, PROMPT + NEW), out.shape
        return time.perf_counter() - t0

    once()
    median = statistics.median(once() for _ in range(args.rounds))
    print(json.dumps({
        "bench": "torch_generate_tokens", "preset": args.preset, "batch": args.batch,
        "prompt": PROMPT, "new_tokens": NEW, "threads": args.threads,
        "median_s": round(median, 4), "tokens_per_s": round(args.batch * NEW / median),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()

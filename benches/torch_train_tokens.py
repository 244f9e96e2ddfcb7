#!/usr/bin/env python3
"""PyTorch CPU training throughput, for comparison with burnish's own training benchmark.

    pip install torch transformers
    python benches/torch_train_tokens.py --preset fixture --threads 2
    python benches/torch_train_tokens.py --preset 17m --threads 2 --steps 5

Builds a float32 LlamaForCausalLM from a LlamaConfig (no download), feeds it random token batches
from a seeded generator and times full training steps: forward, loss
(model(input_ids, labels=input_ids).loss), backward and AdamW(lr=1e-4, weight_decay=0.01) step.
After --warmup untimed steps, --steps steps are timed one by one; prints one JSON line with the
median step time and tokens_per_s = batch * seq / median step seconds.

Presets:
  fixture  the fixtures/models/tiny-llama shape (hidden 64, 2 layers, 4 heads, 2 kv heads,
           intermediate 176, vocab 512), batch 8 x seq 64
  17m      hidden 384, 6 layers, 6 heads, 6 kv heads, intermediate 1024, vocab 8192,
           batch 8 x seq 256
Any shape argument given on the command line overrides the preset's value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

PRESETS = {
    "fixture": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        batch=8,
        seq=64,
    ),
    "17m": dict(
        vocab_size=8192,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=6,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        batch=8,
        seq=256,
    ),
}

SHAPE_ARGS = [
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "batch",
    "seq",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="fixture")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager"],
        help="transformers attention implementation (default sdpa)",
    )
    for name in SHAPE_ARGS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be >= 1, --warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    shape = dict(PRESETS[args.preset])
    for name in SHAPE_ARGS:
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    batch, seq = shape.pop("batch"), shape.pop("seq")
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], seq)

    config = LlamaConfig(**shape, tie_word_embeddings=False)
    model = LlamaForCausalLM._from_config(config, attn_implementation=args.attn, dtype=torch.float32)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        for _ in range(args.warmup + args.steps)
    ]

    def step(input_ids: torch.Tensor) -> float:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for input_ids in batches[: args.warmup]:
        step(input_ids)
    times = []
    for input_ids in batches[args.warmup :]:
        t0 = time.perf_counter()
        step(input_ids)
        times.append(time.perf_counter() - t0)

    median = statistics.median(times)
    print(
        json.dumps(
            {
                "framework": "pytorch",
                "preset": args.preset,
                "params": params,
                "batch": batch,
                "seq": seq,
                "steps": args.steps,
                "step_ms_median": median * 1e3,
                "tokens_per_s": batch * seq / median,
                "step_ms_min": min(times) * 1e3,
                "step_ms_mean": statistics.fmean(times) * 1e3,
                "threads": args.threads,
                "attn": args.attn,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""PyTorch training throughput, for comparison with burnish's own training benchmarks
(`cargo bench --bench train_tokens` on the CPU, `burnish bench-train` on any backend).

    pip install torch transformers
    python benches/torch_train_tokens.py --preset fixture --threads 2
    python benches/torch_train_tokens.py --preset 17m --threads 2 --steps 5
    python benches/torch_train_tokens.py --preset smollm2-135m --device cuda --dtype bf16 \
        --batch 8 --seq 1024 --max-grad-norm 1.0 [--lora 16]

Builds a LlamaForCausalLM from a LlamaConfig (no download; float32 parameters), feeds it random
token batches from a seeded generator and times full training steps: forward, loss
(model(input_ids, labels=input_ids).loss), backward, optionally the gradients clipped by their
global norm (--max-grad-norm, as every burnish trainer does), and an AdamW(lr=1e-4,
weight_decay=0.01) step. --dtype bf16 runs forward and loss under torch.autocast(bfloat16)
(mixed precision: f32 parameters and optimizer, bf16 matrix products), as burnish's
`compute_dtype: bf16`. --lora R freezes the model and trains rank-R adapters (alpha 2R, PEFT's
initialization) on q/k/v/o/gate/up/down, written here so that no peft is needed. After --warmup
untimed steps, --steps steps are timed one by one, each ended by a device synchronization; prints
one JSON line with the median step time, tokens_per_s = batch * seq / median step seconds, and
the peak memory (CUDA: max_memory_allocated/reserved; CPU: the process's max RSS).

Presets:
  fixture  the fixtures/models/tiny-llama shape (hidden 64, 2 layers, 4 heads, 2 kv heads,
           intermediate 176, vocab 512), batch 8 x seq 64
  17m      hidden 384, 6 layers, 6 heads, 6 kv heads, intermediate 1024, vocab 8192,
           batch 8 x seq 256
  smollm2-135m  HuggingFaceTB/SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads, 3 kv
           heads, intermediate 1536, vocab 49152, tied embeddings), batch 8 x seq 1024
  llama-1b TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 heads, 4 kv heads,
           intermediate 5632, vocab 32000), batch 4 x seq 2048
Any shape argument given on the command line overrides the preset's value.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
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
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        batch=8,
        seq=1024,
    ),
    "llama-1b": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        batch=4,
        seq=2048,
    ),
}

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraLinear(torch.nn.Module):
    """A frozen nn.Linear plus scale * B(A(x)): PEFT's LoRA (A kaiming-uniform, B zero)."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.a = torch.nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.b = torch.nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        torch.nn.init.kaiming_uniform_(self.a.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.b.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.b(self.a(x)) * self.scale


def add_lora(model: torch.nn.Module, rank: int) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name in LORA_TARGETS:
            child = getattr(module, name, None)
            if isinstance(child, torch.nn.Linear):
                setattr(module, name, LoraLinear(child, rank, alpha=2.0 * rank))

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
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="f32, or bf16 autocast")
    p.add_argument("--lora", type=int, default=None, metavar="R", help="train rank-R adapters")
    p.add_argument(
        "--max-grad-norm", type=float, default=None, help="clip gradients by their global norm"
    )
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
    if args.lora is not None and args.lora < 1:
        p.error("--lora must be >= 1")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    shape = dict(PRESETS[args.preset])
    for name in SHAPE_ARGS:
        if getattr(args, name) is not None:
            shape[name] = getattr(args, name)
    batch, seq = shape.pop("batch"), shape.pop("seq")
    shape["max_position_embeddings"] = max(shape["max_position_embeddings"], seq)
    shape.setdefault("tie_word_embeddings", False)

    config = LlamaConfig(**shape)
    model = LlamaForCausalLM._from_config(config, attn_implementation=args.attn, dtype=torch.float32)
    model.to(device)
    if args.lora is not None:
        add_lora(model, args.lora)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.01)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    gen = torch.Generator().manual_seed(args.seed)
    batches = [
        torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(device)
        for _ in range(args.warmup + args.steps)
    ]

    def step(input_ids: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = model(input_ids=input_ids, labels=input_ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
        opt.step()
        sync(device)
        return loss.detach()

    losses = []
    began = time.perf_counter()
    for input_ids in batches[: args.warmup]:
        losses.append(step(input_ids))
    warmup_s = time.perf_counter() - began
    times = []
    for input_ids in batches[args.warmup :]:
        t0 = time.perf_counter()
        losses.append(step(input_ids))
        times.append(time.perf_counter() - t0)

    median = statistics.median(times)
    result = {
        "framework": "pytorch",
        "backend": device.type,
        "preset": args.preset,
        "shape": {
            "vocab": config.vocab_size,
            "hidden": config.hidden_size,
            "ffn": config.intermediate_size,
            "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "tied": bool(config.tie_word_embeddings),
        },
        "params": params,
        "trainable": sum(p.numel() for p in trainable),
        "batch": batch,
        "seq": seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "lora": args.lora,
        "step_ms_median": median * 1e3,
        "tokens_per_s": batch * seq / median,
        "step_ms_min": min(times) * 1e3,
        "step_ms_mean": statistics.fmean(times) * 1e3,
        "warmup_s": warmup_s,
        "loss_first": losses[0].item(),
        "loss_last": losses[-1].item(),
        "threads": args.threads,
        "attn": args.attn,
        "torch": torch.__version__,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if device.type == "cuda":
        result["peak_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["peak_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        result["gpu"] = torch.cuda.get_device_name(device)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

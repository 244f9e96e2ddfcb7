"""GRPO's learning check in PyTorch + transformers: the independent run beside
`pipelines/grpo-math-tiny.yaml`.

A character-level Llama (hidden 64, 2 layers, 4 heads, FFN 256, tied embeddings) learns
`aa+bb=` sums by SFT until its held-out greedy exact match reaches 0.20, then GRPO with a 0/1
exact-match reward: G = 8 completions for each of 64 prompts per step, temperature 1, group
scaling, TRL's `grpo` loss, beta = 0, AdamW lr 5e-5 betas (0.9, 0.99), gradients clipped at
1.0 (TRL's default), 400 steps. `--shuffle-advantages` is the control: the advantages permuted
within each step's batch, so their expected gradient is zero.

    python benches/torch_grpo_learning.py --seed 0
    python benches/torch_grpo_learning.py --seed 0 --shuffle-advantages

Prints one JSON line: held-out greedy exact match after SFT and after GRPO, the last steps'
mean training reward and the seconds per GRPO step.
"""

import argparse
import json
import random
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CHARS = "0123456789+="
EOS, PAD = len(CHARS), len(CHARS) + 1
STOI = {c: i for i, c in enumerate(CHARS)}


def encode(s):
    return [STOI[c] for c in s]


def decode(ids):
    out = []
    for i in ids:
        if i == EOS or i == PAD:
            break
        out.append(CHARS[i])
    return "".join(out)


def problems(seed):
    pairs = [(a, b) for a in range(100) for b in range(100)]
    random.Random(seed).shuffle(pairs)
    return pairs[500:], pairs[:500]


def prompt(p):
    return encode(f"{p[0]:02d}+{p[1]:02d}=")


def answer(p):
    return str(p[0] + p[1])


@torch.no_grad()
def sample(model, batch, n, do_sample):
    # Every prompt is 6 tokens: no padding, positions from 0.
    ids = torch.tensor([prompt(p) for p in batch for _ in range(n)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=5,
        do_sample=do_sample,
        temperature=1.0 if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    return ids, out[:, ids.shape[1]:]


def exact_match(model, held):
    right = 0
    for i in range(0, len(held), 100):
        batch = held[i : i + 100]
        _, comp = sample(model, batch, 1, False)
        right += sum(decode(c.tolist()) == answer(p) for c, p in zip(comp, batch))
    return right / len(held)


def sft(model, train, held, rng):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(1, 2001):
        batch = rng.sample(train, 128)
        seqs = [prompt(p) + encode(answer(p)) + [EOS] for p in batch]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [PAD] * (width - len(s)) for s in seqs])
        labels = ids.clone()
        labels[:, :6] = -100
        labels[ids == PAD] = -100
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            model.eval()
            em = exact_match(model, held)
            model.train()
            if em >= 0.20:
                return step, em
    return step, em


def grpo_step(model, opt, train, rng, shuffle, g=8, prompts=64):
    batch = rng.sample(train, prompts)
    model.eval()
    ids, comp = sample(model, batch, g, True)
    model.train()
    texts = [decode(c.tolist()) for c in comp]
    rewards = torch.tensor(
        [float(t == answer(batch[k // g])) for k, t in enumerate(texts)]
    )
    grouped = rewards.view(-1, g)
    adv = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)
    adv = adv.view(-1)
    if shuffle:
        adv = adv[torch.randperm(len(adv))]
    # The completion's tokens up to and including its first EOS.
    is_eos = comp == EOS
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), comp.shape[1])
    mask = (torch.arange(comp.shape[1])[None, :] <= first[:, None]).float()
    mask = mask * (comp != PAD).float()
    full = torch.cat([ids, comp], 1)
    logits = model(full, attention_mask=torch.ones_like(full)).logits
    logits = logits[:, ids.shape[1] - 1 : -1] / 1.0
    logp = torch.log_softmax(logits.float(), -1).gather(2, comp[:, :, None]).squeeze(2)
    ratio = torch.exp(logp - logp.detach())
    per_token = -ratio * adv[:, None]
    loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return rewards.mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shuffle-advantages", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    train, held = problems(0)
    cfg = LlamaConfig(
        vocab_size=len(CHARS) + 2,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(cfg)
    sft_steps, before = sft(model, train, held, rng)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.9, 0.99), weight_decay=0.0)
    t0 = time.perf_counter()
    rewards = [
        grpo_step(model, opt, train, rng, args.shuffle_advantages) for _ in range(args.steps)
    ]
    per_step = (time.perf_counter() - t0) / args.steps
    model.eval()
    after = exact_match(model, held)
    print(
        json.dumps(
            {
                "bench": "torch_grpo_learning",
                "seed": args.seed,
                "shuffle_advantages": args.shuffle_advantages,
                "sft_steps": sft_steps,
                "exact_match_sft": before,
                "exact_match_grpo": after,
                "reward_last_50": sum(rewards[-50:]) / 50,
                "s_per_step": round(per_step, 4),
            }
        )
    )


if __name__ == "__main__":
    main()

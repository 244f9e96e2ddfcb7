#!/usr/bin/env python3
"""Run burnish's and PyTorch's training benchmarks back to back, round after round, on one
preset, and print each round's speed ratio.

On a shared or throttled machine a step's time drifts by tens of percent from one run to the
next; two runs made one right after the other see mostly the same conditions, so the ratio
within a round is steadier than two numbers measured apart.

    pip install torch transformers
    python benches/compare_train_tokens.py --preset 17m --rounds 5 --steps 5
    python benches/compare_train_tokens.py --preset fixture --rounds 5 --steps 20

Each round runs `cargo bench --bench train_tokens -- <preset>` (built on the first round) and
`benches/torch_train_tokens.py` with the same number of timed steps and of threads
(`RAYON_NUM_THREADS` for burnish, `torch.set_num_threads` for PyTorch). The ratio is
PyTorch's median step time over burnish's: above 1, burnish is faster.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def last_json(out: str, what: str) -> dict:
    for line in reversed(out.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    sys.exit(f"no JSON result in the output of {what}:\n{out}")


def burnish(preset: str, steps: int, threads: int) -> dict:
    env = dict(os.environ, BURNISH_BENCH_STEPS=str(steps), RAYON_NUM_THREADS=str(threads))
    cmd = ["cargo", "bench", "-q", "--bench", "train_tokens", "--", preset]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with status {run.returncode}:\n{run.stderr}")
    return last_json(run.stdout, "the burnish benchmark")


def torch(preset: str, steps: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "benches" / "torch_train_tokens.py"),
        "--preset",
        preset,
        "--threads",
        str(threads),
        "--steps",
        str(steps),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"the PyTorch benchmark failed with status {run.returncode}:\n{run.stderr}")
    return last_json(run.stdout, "the PyTorch benchmark")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["fixture", "17m"], default="17m")
    p.add_argument("--rounds", type=int, default=5, help="rounds of one run each (default 5)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run (default 5)")
    p.add_argument("--threads", type=int, default=2, help="threads for both (default 2)")
    args = p.parse_args()
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        p.error("--rounds, --steps and --threads must be >= 1")

    print(f"{'round':>5}  {'PyTorch ms':>10}  {'burnish ms':>10}  {'ratio':>6}")
    ratios = []
    for r in range(1, args.rounds + 1):
        t = torch(args.preset, args.steps, args.threads)["step_ms_median"]
        b = burnish(args.preset, args.steps, args.threads)["step_ms_median"]
        ratios.append(t / b)
        print(f"{r:>5}  {t:>10.1f}  {b:>10.1f}  {t / b:>5.2f}x", flush=True)
    print(
        f"ratio over {args.rounds} rounds: median {statistics.median(ratios):.2f}x, "
        f"range {min(ratios):.2f}x to {max(ratios):.2f}x"
    )


if __name__ == "__main__":
    main()

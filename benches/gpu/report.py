#!/usr/bin/env python3
"""The GPU lane's bookkeeping (called by benches/gpu/run.sh; standard library only).

    report.py record --row N --framework F --file OUT --rc RC --spec "backend preset ..." \\
        [--device-mem MB]          # one speed.jsonl line from a benchmark's output
    report.py record --row N --framework F --skip REASON --spec "..."
    report.py report --out DIR --gpu NAME ...   # gpu-report.md and gpu.json

Model FLOPs per trained token (PaLM, appendix B), with N the weights that take part in matrix
products (every projection and the output head; not the input embedding, a lookup) and the
attention term 12·L·H·Q·T (no causal discount):
    full weights  6·N + 12·L·H·Q·T
    LoRA          4·N + 12·L·H·Q·T   (frozen weights need no weight gradient; the adapters'
                                      own FLOPs, under 1% at rank 16, are left out)
MFU = tokens/s × FLOPs/token ÷ the chip's dense bf16 peak (f32 rows too, so rows compare).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets; matched against
# nvidia-smi's name in this order.
PEAKS = [
    ("H200 NVL", 835e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("GH200", 989.4e12),
    ("H200", 989.4e12),
    ("H100", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362.05e12),
]

SPEC_FIELDS = ["backend", "preset", "batch", "seq", "warmup", "steps", "dtype", "lora"]


def peak_flops(gpu: str) -> float | None:
    for key, value in PEAKS:
        if key in gpu:
            return value
    return None


def flops_per_token(shape: dict, seq: int, lora: bool) -> float:
    d, f, L = shape["hidden"], shape["ffn"], shape["layers"]
    h, kv, V = shape["heads"], shape["kv_heads"], shape["vocab"]
    hd = d // h
    per_layer = d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * f
    n = L * per_layer + V * d
    attention = 12 * L * h * hd * seq
    return (4 if lora else 6) * n + attention


def parse_spec(spec: str) -> dict:
    values = spec.split()
    out = dict(zip(SPEC_FIELDS, values))
    for k in ("batch", "seq", "warmup", "steps"):
        if k in out:
            out[k] = int(out[k])
    out["lora"] = None if out.get("lora", "-") == "-" else int(out["lora"])
    return out


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def record(args: argparse.Namespace) -> None:
    row = {"row": args.row, "framework": args.framework, "spec": parse_spec(args.spec)}
    if args.skip:
        row.update(status="skipped", error=args.skip)
    else:
        try:
            with open(args.file, encoding="utf-8", errors="replace") as f:
                result = last_json(f.read())
        except OSError:
            result = None
        if args.rc == 0 and result is not None:
            row.update(status="ok", result=result)
        else:
            try:
                with open(args.file + ".err", encoding="utf-8", errors="replace") as f:
                    err = [l for l in f.read().splitlines() if l.strip()]
            except OSError:
                err = []
            why = {124: "timed out", 137: "killed"}.get(args.rc, f"exit status {args.rc}")
            # A Rust panic's message (not its backtrace), else the output's last lines.
            at = next((i for i, l in enumerate(err) if "panicked at" in l), None)
            shown = err[at : at + 2] if at is not None else err[-3:]
            row.update(status="error", error=why + (": " + " | ".join(shown) if shown else ""))
    if args.device_mem not in (None, ""):
        row["gpu_peak_mb"] = float(args.device_mem)
    print(json.dumps(row))


def load_rows(out: str) -> list[dict]:
    rows = []
    path = os.path.join(out, "speed.jsonl")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(l) for l in f if l.strip()]
    return rows


def load_checks(out: str) -> list[dict]:
    checks = []
    for path in sorted(glob.glob(os.path.join(out, "selftest-*.json"))):
        try:
            with open(path, encoding="utf-8") as f:
                checks.extend(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            checks.append({"backend": path, "name": "selftest", "status": "FAIL", "detail": str(e)})
    return checks


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def summarize(rows: list[dict], peak: float | None) -> list[dict]:
    """One entry per row id: both frameworks side by side."""
    by_row: dict[int, dict] = {}
    for r in rows:
        entry = by_row.setdefault(r["row"], {"row": r["row"], "spec": r["spec"]})
        entry[r["framework"]] = r
    out = []
    for entry in [by_row[k] for k in sorted(by_row)]:
        spec = entry["spec"]
        shape = None
        for fw in ("burnish", "pytorch"):
            res = entry.get(fw, {}).get("result")
            if res and "shape" in res:
                shape = res["shape"]
                break
        fpt = flops_per_token(shape, spec["seq"], spec["lora"] is not None) if shape else None
        line = {"row": entry["row"], **spec, "flops_per_token": fpt}
        for fw in ("burnish", "pytorch"):
            r = entry.get(fw)
            if r is None:
                continue
            res = r.get("result") or {}
            tps = res.get("tokens_per_s")
            line[fw] = {
                "status": r["status"],
                "error": r.get("error"),
                "tokens_per_s": tps,
                "step_ms_median": res.get("step_ms_median"),
                "warmup_s": res.get("warmup_s"),
                "loss_first": res.get("loss_first"),
                "loss_last": res.get("loss_last"),
                "gpu_peak_mb": r.get("gpu_peak_mb"),
                "peak_allocated_mb": res.get("peak_allocated_mb"),
                "peak_rss_mb": res.get("peak_rss_mb"),
                "params": res.get("params"),
                "trainable": res.get("trainable"),
                "mfu": (tps * fpt / peak) if (tps and fpt and peak) else None,
            }
        b = line.get("burnish", {}).get("tokens_per_s")
        t = line.get("pytorch", {}).get("tokens_per_s")
        line["ratio"] = (b / t) if (b and t) else None
        out.append(line)
    return out


def report(args: argparse.Namespace) -> None:
    checks = load_checks(args.out)
    rows = load_rows(args.out)
    peak = peak_flops(args.gpu)
    speed = summarize(rows, peak)
    counts = {s: sum(1 for c in checks if c.get("status") == s) for s in ("PASS", "FAIL", "SKIP")}

    title = args.gpu if args.mode == "gpu" else "dry run on the CPU"
    md = [f"# GPU lane: {title}", ""]
    md.append(
        f"{args.binary} · PyTorch {args.torch} · mode {args.mode} · "
        f"{args.seconds} s · Vulkan: {args.vulkan}"
    )
    md += ["", f"## Correctness: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP", ""]
    md.append("| | backend | check | measured | tolerance | reference | detail |")
    md.append("|---|---|---|---|---|---|---|")
    for c in checks:
        detail = str(c.get("detail", "")).replace("|", "\\|").replace("\n", " ")
        if len(detail) > 160:
            detail = detail[:157] + "..."
        md.append(
            f"| {c.get('status')} | {c.get('backend')} | {c.get('name')} | "
            f"{fmt(c.get('measured'), '.2e')} | {fmt(c.get('tolerance'), '.0e')} | "
            f"{c.get('reference', '')} | {detail} |"
        )
    peak_txt = f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "unknown peak (no MFU)"
    md += ["", f"## Training speed against PyTorch ({peak_txt})", ""]
    # Peak memory: the GPU's (sampled) on a GPU, the process's peak RSS in the dry run.
    mem_key, mem = ("gpu_peak_mb", "GPU MiB") if args.mode == "gpu" else ("peak_rss_mb", "RSS MiB")
    md.append(
        "| row | backend | model | batch × seq | dtype | mode | burnish tok/s | PyTorch tok/s "
        f"| ratio | MFU burnish | MFU PyTorch | {mem} burnish | {mem} PyTorch |"
    )
    md.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for s in speed:
        b, t = s.get("burnish", {}), s.get("pytorch", {})
        mode = f"LoRA r{s['lora']}" if s["lora"] else "full"

        def cell(r: dict, key: str, spec: str) -> str:
            if not r:
                return "–"
            if r.get("status") != "ok":
                return r.get("status", "?")
            return fmt(r.get(key), spec)

        md.append(
            f"| {s['row']} | {s['backend']} | {s['preset']} | {s['batch']} × {s['seq']} | "
            f"{s['dtype']} | {mode} | {cell(b, 'tokens_per_s', ',.0f')} | "
            f"{cell(t, 'tokens_per_s', ',.0f')} | {fmt(s['ratio'], '.2f')} | "
            f"{cell(b, 'mfu', '.1%')} | {cell(t, 'mfu', '.1%')} | "
            f"{cell(b, mem_key, ',.0f')} | {cell(t, mem_key, ',.0f')} |"
        )
        for fw, r in (("burnish", b), ("PyTorch", t)):
            if r and r.get("status") != "ok":
                notes.append(f"- row {s['row']} {fw}: {r.get('status')}: {r.get('error')}")
    md += ["", "ratio = burnish tokens/s ÷ PyTorch tokens/s (above 1: burnish is faster)."]
    md.append(
        "MFU counts 6N + 12·L·d·T FLOPs per token (4N + … for LoRA), N excluding the input "
        "embedding; GPU MiB is the device's used memory at its peak minus before the run, "
        "RSS MiB the process's peak resident memory."
    )
    if notes:
        md += ["", "### Rows that did not run", "", *notes]
    md.append("")
    with open(os.path.join(args.out, "gpu-report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    data = {
        "gpu": args.gpu,
        "mode": args.mode,
        "binary": args.binary,
        "torch": args.torch,
        "vulkan": args.vulkan,
        "seconds": int(args.seconds),
        "peak_flops": peak,
        "checks": checks,
        "speed": speed,
        "raw": rows,
    }
    with open(os.path.join(args.out, "gpu.json"), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--row", type=int, required=True)
    r.add_argument("--framework", required=True)
    r.add_argument("--spec", required=True)
    r.add_argument("--file")
    r.add_argument("--rc", type=int, default=0)
    r.add_argument("--skip")
    r.add_argument("--device-mem")
    g = sub.add_parser("report")
    g.add_argument("--out", required=True)
    g.add_argument("--gpu", required=True)
    g.add_argument("--mode", required=True)
    g.add_argument("--binary", default="")
    g.add_argument("--torch", default="")
    g.add_argument("--vulkan", default="")
    g.add_argument("--seconds", default="0")
    args = p.parse_args()
    if args.cmd == "record":
        if not args.skip and not args.file:
            p.error("record needs --file or --skip")
        record(args)
    else:
        report(args)


if __name__ == "__main__":
    sys.exit(main())

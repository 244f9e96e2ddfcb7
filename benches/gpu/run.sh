#!/usr/bin/env bash
# The GPU lane, in one command: correctness of the `cuda` and `wgpu` backends (against the
# logits transformers computed and against the CPU backend), then training tokens/s and peak
# GPU memory against PyTorch on the same GPU, then a report. See benches/gpu/README.md.
#
#   benches/gpu/run.sh [--out DIR] [--bin PATH] [--python PY] [--budget SECONDS]
#   benches/gpu/run.sh --cpu ...     # the dry run: CPU backend, wgpu on lavapipe, PyTorch CPU,
#                                    # tiny sizes (CI runs this)
#
# Writes under DIR (default $OUT, else ./gpu-out): gpu-report.md, gpu.json, run.log, the
# selftest JSON of each backend and speed.jsonl. Reads nothing from the network. Exits 0 when
# every correctness check passed or was skipped with a reason and every speed row ran, 1 when
# something failed (the report says what), 2 when the machine cannot run the lane at all (no
# NVIDIA driver, no NVRTC, no binary).
set -uo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

MODE=gpu
OUT_DIR="${OUT:-}"
BIN=""
PY="${PYTHON:-python3}"
BUDGET=450 # seconds for the whole lane; rows that would not fit are skipped and reported
while [ $# -gt 0 ]; do
    case "$1" in
    --cpu) MODE=cpu ;;
    --out) OUT_DIR="$2"; shift ;;
    --bin) BIN="$2"; shift ;;
    --python) PY="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument \`$1\`" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
HERE="$ROOT/benches/gpu"
[ -n "$OUT_DIR" ] || OUT_DIR="$PWD/gpu-out"
mkdir -p "$OUT_DIR" || { echo "run.sh: cannot create $OUT_DIR" >&2; exit 2; }
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$OUT_DIR/run.log") 2>&1

START=$SECONDS
say() { echo "gpu-lane [$((SECONDS - START))s] $*"; }
# A machine that cannot run the lane: one clear line, in the log and in the report.
die() {
    echo "gpu-lane: FAIL $*"
    printf '# GPU lane\n\nFAIL %s\n' "$*" >"$OUT_DIR/gpu-report.md"
    "$PY" -c 'import json,sys; print(json.dumps({"error": sys.argv[1]}))' "$*" >"$OUT_DIR/gpu.json" 2>/dev/null ||
        printf '{"error": "see gpu-report.md"}\n' >"$OUT_DIR/gpu.json"
    exit 2
}
say "mode $MODE, writing to $OUT_DIR"

# --- the binary ------------------------------------------------------------------------------
if [ -z "$BIN" ]; then
    for c in "$ROOT/burnish" "$ROOT/burnish.gz" "$ROOT/target/release/burnish"; do
        if [ -f "$c" ]; then BIN="$c"; break; fi
    done
fi
[ -n "$BIN" ] && [ -f "$BIN" ] || die "no burnish binary: pass --bin PATH (a release build, gzipped or not)"
case "$BIN" in
*.gz) gunzip -c "$BIN" >"$WORK/burnish" || die "cannot unpack $BIN"; BIN="$WORK/burnish" ;;
esac
chmod +x "$BIN" 2>/dev/null || true
VERSION="$("$BIN" --version 2>&1)" || die "$BIN does not run: $VERSION"
say "binary: $VERSION ($BIN)"
MODELS="$ROOT/fixtures/models"
[ -f "$MODELS/tiny-llama/reference.safetensors" ] || die "fixtures missing: $MODELS/tiny-llama/reference.safetensors"

# --- Python and PyTorch ----------------------------------------------------------------------
TORCH=""
if TORCH="$("$PY" -c 'import torch, transformers; print(torch.__version__, "/ transformers", transformers.__version__)' 2>&1)"; then
    say "pytorch: $TORCH"
else
    say "no PyTorch anchor ($PY: ${TORCH##*$'\n'}): speed rows run burnish alone"
    TORCH=""
fi

# --- the GPU, its driver, NVRTC and CUDA headers ---------------------------------------------
GPU_NAME="cpu"
if [ "$MODE" = gpu ]; then
    command -v nvidia-smi >/dev/null || die "no NVIDIA driver: nvidia-smi is not on PATH"
    INFO="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)" ||
        die "no NVIDIA driver: nvidia-smi fails: $INFO"
    GPU_NAME="$(echo "$INFO" | head -1 | cut -d, -f1)"
    say "gpu: $INFO"
    nvidia-smi | sed -n '1,4p'

    # The Python packages' CUDA libraries (PyTorch's wheels bring NVRTC) and headers.
    SITE="$("$PY" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null || true)"
    NV_DIRS=""
    for s in $SITE; do
        for d in "$s"/nvidia/*/ "$s"/nvidia/cu*/; do [ -d "$d" ] && NV_DIRS="$NV_DIRS ${d%/}"; done
    done
    for d in $NV_DIRS; do
        [ -d "$d/lib" ] && LD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
        [ -d "$d" ] && LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
    NVRTC=""
    IFS=: read -ra LIBDIRS <<<"${LD_LIBRARY_PATH:-}"
    for d in "${LIBDIRS[@]}"; do
        f="$(ls "$d"/libnvrtc.so* 2>/dev/null | grep -v builtins | sort -V | tail -1)"
        [ -n "$f" ] && { NVRTC="$f"; break; }
    done
    [ -n "$NVRTC" ] || NVRTC="$(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so/ && !/builtins/ {print $NF; exit}')"
    [ -n "$NVRTC" ] || die "NVRTC not found (libnvrtc.so*): the cuda backend compiles its kernels with it; install CUDA's nvrtc or pip install nvidia-cuda-nvrtc-cu12"
    # An unversioned name first, so whichever major version is here gets loaded.
    mkdir -p "$WORK/lib" && ln -sf "$NVRTC" "$WORK/lib/libnvrtc.so"
    export LD_LIBRARY_PATH="$WORK/lib:$(dirname "$NVRTC")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "nvrtc: $NVRTC"

    # NVRTC compiles with -I$CUDA_PATH/include (cuda_runtime.h, cuda_bf16.h, ...).
    if [ -n "${CUDA_PATH:-}" ] && [ -f "$CUDA_PATH/include/cuda_runtime.h" ]; then
        :
    elif [ -f /usr/local/cuda/include/cuda_runtime.h ]; then
        export CUDA_PATH=/usr/local/cuda
    elif d="$(for d in $NV_DIRS; do [ -f "$d/include/cuda_runtime.h" ] && echo "$d"; done | head -1)" && [ -n "$d" ]; then
        export CUDA_PATH="$d" # a whole toolkit's headers in one package (nvidia/cu13)
    else
        # One package per component (nvidia/cuda_runtime, nvidia/cuda_cccl, ...): gather them.
        mkdir -p "$WORK/cuda/include"
        for d in $NV_DIRS; do
            [ -d "$d/include" ] || continue
            for f in "$d"/include/*; do
                [ -e "$WORK/cuda/include/$(basename "$f")" ] || ln -s "$f" "$WORK/cuda/include/"
            done
            case "$d" in *cccl*) ln -sfn "$d/include" "$WORK/cuda/include/cccl" ;; esac
        done
        export CUDA_PATH="$WORK/cuda"
        [ -f "$CUDA_PATH/include/cuda_runtime.h" ] ||
            say "WARNING: no CUDA headers (cuda_runtime.h) found: kernels that include them will not compile"
    fi
    say "cuda headers: $CUDA_PATH/include"
fi

# Vulkan: without a loader, wgpu is skipped (and said so); CUDA goes on.
VULKAN=yes
if ! ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1'; then
    VULKAN="no Vulkan loader (libvulkan.so.1 is not installed)"
    say "wgpu: skipped, $VULKAN"
fi

# --- 1. correctness --------------------------------------------------------------------------
FAILED=0
selftest() { # backend, extra args...
    local backend="$1"; shift
    say "selftest $backend"
    timeout 240 "$BIN" selftest --backend "$backend" --models "$MODELS" \
        --json "$OUT_DIR/selftest-$backend.json" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        FAILED=1
        [ $rc -eq 124 ] && say "selftest $backend: timed out after 240 s"
        [ -f "$OUT_DIR/selftest-$backend.json" ] ||
            printf '[{"backend": "%s", "name": "selftest", "status": "FAIL", "detail": "exit status %s (see run.log)"}]\n' \
                "$backend" "$rc" >"$OUT_DIR/selftest-$backend.json"
    fi
}
if [ "$MODE" = gpu ]; then
    selftest cuda
    if [ "$VULKAN" = yes ]; then selftest wgpu; fi
else
    selftest cpu
    if [ "$VULKAN" = yes ]; then selftest wgpu --allow-cpu-adapter; fi
fi

# --- 2. speed against PyTorch ----------------------------------------------------------------
# Rows in order of importance; each: backend preset batch seq warmup steps dtype lora
if [ "$MODE" = gpu ]; then
    ROWS=(
        "cuda smollm2-135m 8 1024 3 10 bf16 -"
        "cuda llama-1b 4 2048 2 5 bf16 -"
        "cuda smollm2-135m 8 1024 3 10 bf16 16"
        "cuda llama-1b 4 2048 2 5 bf16 16"
    )
    # wgpu's speed only where its checks ran on a GPU adapter (not on lavapipe).
    grep -q '"status": "PASS"' "$OUT_DIR/selftest-wgpu.json" 2>/dev/null &&
        ROWS+=("wgpu smollm2-135m 8 1024 2 5 f32 -")
    TORCH_DEVICE=cuda
    THREADS=4
else
    ROWS=(
        "cpu fixture 4 64 1 3 bf16 -"
        "cpu fixture 4 64 1 3 bf16 4"
    )
    [ "$VULKAN" = yes ] && ROWS+=("wgpu fixture 4 64 1 3 f32 -")
    TORCH_DEVICE=cpu
    THREADS="$(nproc 2>/dev/null || echo 2)"
fi

# Peak GPU memory of a command: the GPU's used memory sampled every 100 ms, minus what was used
# before it started (rows run one at a time; works inside containers, where nvidia-smi does not
# see the process ids).
measured() { # file, command...
    local file="$1"; shift
    if [ "$MODE" = gpu ]; then
        local base
        base="$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$WORK/mem" 2>/dev/null &
        local sampler=$!
        "$@" >"$file" 2>"$file.err"
        local rc=$?
        kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
        local peak
        peak="$(sort -n "$WORK/mem" | tail -1)"
        echo "$(( ${peak:-$base} - base ))" >"$file.gpumem"
        return $rc
    fi
    "$@" >"$file" 2>"$file.err"
}

# The cause of a failed run: its panic message, else its last lines.
cause() { grep -m1 -A1 'panicked at' "$1" 2>/dev/null | tr '\n' ' ' || true; }
why() { local c; c="$(cause "$1")"; [ -n "$c" ] && echo "$c" || tail -3 "$1"; }

# Append a row's JSON (or its failure) to speed.jsonl.
record() { # row-id framework file rc (the row's spec is $row)
    "$PY" "$HERE/report.py" record --row "$1" --framework "$2" --file "$3" --rc "$4" --spec "$row" \
        --device-mem "$( [ -f "$3.gpumem" ] && cat "$3.gpumem" || echo '')" >>"$OUT_DIR/speed.jsonl"
}

: >"$OUT_DIR/speed.jsonl"
i=0
for row in "${ROWS[@]}"; do
    i=$((i + 1))
    read -r backend preset batch seq warmup steps dtype lora <<<"$row"
    left=$((BUDGET - (SECONDS - START)))
    if [ "$left" -lt 45 ]; then
        say "row $i ($row): skipped, ${left}s left of the ${BUDGET}s budget"
        "$PY" "$HERE/report.py" record --row "$i" --framework burnish --skip "time budget: ${left}s left" \
            --spec "$row" >>"$OUT_DIR/speed.jsonl"
        continue
    fi
    limit=$(( left < 150 ? left : 150 ))
    args=(--preset "$preset" --batch "$batch" --seq "$seq" --warmup "$warmup" --steps "$steps")
    bargs=("${args[@]}" --backend "$backend")
    targs=("${args[@]}" --device "$TORCH_DEVICE" --threads "$THREADS" --dtype "$dtype" --max-grad-norm 1.0)
    [ "$dtype" = bf16 ] && bargs+=(--bf16)
    [ "$lora" != - ] && { bargs+=(--lora "$lora"); targs+=(--lora "$lora"); }
    say "row $i: burnish ${bargs[*]}"
    measured "$WORK/b$i" timeout "$limit" "$BIN" bench-train "${bargs[@]}"
    rc=$?
    [ $rc -eq 0 ] || { FAILED=1; say "row $i: burnish exit status $rc: $(why "$WORK/b$i.err")"; }
    record "$i" burnish "$WORK/b$i" "$rc"
    if [ -n "$TORCH" ]; then
        left=$((BUDGET - (SECONDS - START)))
        limit=$(( left < 120 ? (left > 20 ? left : 20) : 120 ))
        say "row $i: pytorch ${targs[*]}"
        measured "$WORK/t$i" timeout "$limit" "$PY" "$ROOT/benches/torch_train_tokens.py" "${targs[@]}"
        rc=$?
        [ $rc -eq 0 ] || { FAILED=1; say "row $i: pytorch exit status $rc: $(why "$WORK/t$i.err")"; }
        record "$i" pytorch "$WORK/t$i" "$rc"
    fi
done

# --- 3. the report ---------------------------------------------------------------------------
"$PY" "$HERE/report.py" report --out "$OUT_DIR" --gpu "$GPU_NAME" --mode "$MODE" \
    --binary "$VERSION" --torch "${TORCH:-none}" --vulkan "$VULKAN" --seconds "$((SECONDS - START))" ||
    { say "the report could not be written"; exit 1; }
say "done in $((SECONDS - START)) s: $OUT_DIR/gpu-report.md"
cat "$OUT_DIR/gpu-report.md"
exit $FAILED

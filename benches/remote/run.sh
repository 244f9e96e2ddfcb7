#!/usr/bin/env bash
# The remote cache against boto3 on a local S3 server, back to back on one machine:
#   - push and pull of a 1 GiB artifact (`test.blob`) and of the quickstart's whole cache, with
#     `burnish push`/`pull`, against boto3's managed transfers (`upload_file`/`download_file`,
#     what `aws s3 cp` runs) of the same files;
#   - a fully cached `burnish run` of the quickstart with the remote (one lookup per stage,
#     answered from the local cache, plus the remote's existence check) and without.
#
#   benches/remote/run.sh --bin target/release/burnish --python PY [--endpoint URL] [--mb 1024]
#
# PY needs `boto3` (and `moto[server]` unless --endpoint names a running server). Results go to
# stdout as a table; nothing is asserted.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin="" py="" endpoint="" mb=1024
while [ $# -gt 0 ]; do
    case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --python) py="$2"; shift 2 ;;
    --endpoint) endpoint="$2"; shift 2 ;;
    --mb) mb="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -x "$bin" ] && [ -x "$py" ] || { echo "usage: $0 --bin BURNISH --python PY" >&2; exit 2; }
bin="$(realpath "$bin")"

work="$(mktemp -d)"
moto_pid=""
cleanup() {
    if [ -n "$moto_pid" ]; then kill "$moto_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

if [ -z "$endpoint" ]; then
    "$(dirname "$py")/moto_server" -H 127.0.0.1 -p 5056 >"$work/moto.log" 2>&1 &
    moto_pid=$!
    endpoint=http://127.0.0.1:5056
    for _ in $(seq 50); do curl -sf -o /dev/null "$endpoint/" && break; sleep 0.2; done
fi
bucket=burnish-bench
curl -sf -X PUT "$endpoint/$bucket" >/dev/null || true
export AWS_ENDPOINT="$endpoint" AWS_ALLOW_HTTP=true AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test BURNISH_TEST_KINDS=1

now() { date +%s.%N; }
rate() { # bytes seconds
    awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f MB/s (%.2f s)", b / s / 1e6, s }'
}
row() { printf '| %-34s | %-26s | %-26s |\n' "$1" "$2" "$3"; }

# The 1 GiB artifact and the quickstart, computed locally first.
cat >"$work/blob.yaml" <<YAML
pipeline: blob
stages:
  big: {kind: test.blob, mb: $mb}
YAML
"$bin" run "$work/blob.yaml" --cache-dir "$work/a" --no-remote -q
"$bin" run pipelines/quickstart.yaml --cache-dir "$work/q" --no-remote -q

measure() { # name manifest cache-a
    local name="$1" manifest="$2" a="$3" prefix="$1-$RANDOM"
    local files bytes t0 t1 t2 t3
    files="$(find "$a/entries" -path '*/out/*' -type f)"
    bytes="$(echo "$files" | xargs cat | wc -c)"
    t0=$(now)
    "$bin" push "$manifest" --cache-dir "$a" --remote "s3://$bucket/$prefix" >/dev/null
    t1=$(now)
    "$bin" pull "$manifest" --cache-dir "$work/$prefix-b" --remote "s3://$bucket/$prefix" >/dev/null
    t2=$(now)
    # boto3 on the same files, one key per file, its default managed transfer (8 MiB parts,
    # 10 threads), files one after another as `aws s3 cp --recursive` does per file.
    read -r up down < <(echo "$files" | "$py" benches/remote/boto3_copy.py "$bucket" "boto-$prefix" "$work/$prefix-boto")
    push=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    pull=$(awk -v a="$t1" -v b="$t2" 'BEGIN { print b - a }')
    row "$name push ($((bytes / 1000000)) MB)" "$(rate "$bytes" "$push")" "$(rate "$bytes" "$up")"
    row "$name pull" "$(rate "$bytes" "$pull")" "$(rate "$bytes" "$down")"
}

echo "| transfer | burnish | boto3 |"
echo "|---|---|---|"
measure "1 GiB artifact" "$work/blob.yaml" "$work/a"
measure "quickstart cache" pipelines/quickstart.yaml "$work/q"

# A fully cached run: with the remote (existence checks) and without.
"$bin" run pipelines/quickstart.yaml --cache-dir "$work/q" --remote "s3://$bucket/cached" -q
for mode in "--no-remote" "--remote s3://$bucket/cached"; do
    best=""
    for _ in 1 2 3; do
        t0=$(now)
        # shellcheck disable=SC2086
        "$bin" run pipelines/quickstart.yaml --cache-dir "$work/q" $mode -q
        t=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { print b - a }')
        best=$(awk -v a="${best:-$t}" -v b="$t" 'BEGIN { print (b < a) ? b : a }')
    done
    row "cached quickstart run ${mode%% *}" "$(printf '%.3f s (best of 3)' "$best")" ""
done

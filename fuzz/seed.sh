#!/usr/bin/env bash
# Seed fuzz/corpus/<target>/ from the fixtures (the corpus is not committed; libFuzzer adds to it
# as it runs). Safe to rerun: files are overwritten by name. Usage: fuzz/seed.sh
set -euo pipefail

fuzz="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$fuzz")"
corpus="$fuzz/corpus"
# The line the multi-file targets split their input at (burnish_stages::fuzzing::SEPARATOR).
sep=$'\n---8<---\n'
# Files larger than this are left out: libFuzzer sizes its inputs from the largest seed.
max_bytes=65536

mkdir -p "$corpus"/{manifest,dataset,checkpoint,tokenizer,chat_template,gguf,lock,record}

small() { [ "$(wc -c < "$1")" -le "$max_bytes" ]; }

# manifest: each manifest alone; one with `extends` followed by its base (the harness writes the
# second part as base.yaml, so the seed's `extends:` is pointed there).
for m in "$root"/pipelines/*.yaml "$root"/fixtures/manifests/*/*.yaml; do
    name="$(basename "$(dirname "$m")")-$(basename "$m" .yaml)"
    base="$(sed -n 's/^extends: *\([^ #]*\).*/\1/p' "$m" | head -n 1)"
    if [ -n "$base" ] && [ -f "$(dirname "$m")/$base" ]; then
        { sed 's/^extends: .*/extends: base.yaml/' "$m"; printf '%s' "$sep"
          cat "$(dirname "$m")/$base"; } > "$corpus/manifest/$name"
    else
        cp "$m" "$corpus/manifest/$name"
    fi
done

# dataset: the first byte picks the file type (its value mod 8: jsonl json csv tsv parquet arrow
# jsonl.gz csv.gz) and the format (its value / 8 mod 9: text alpaca prompt_completion chat
# sharegpt preference kto ranking reasoning); each data file gets the byte of its type and of the
# format its name suggests.
format_of() {
    case "$1" in
        alpaca*) echo 1 ;; prompt_completion*) echo 2 ;; chat* | claudesidian* | openai*) echo 3 ;;
        sharegpt*) echo 4 ;; *prefs* | bad_label*) echo 5 ;; kto*) echo 6 ;; ranking*) echo 7 ;;
        gsm8k* | scored*) echo 8 ;; *) echo 0 ;;
    esac
}
type_of() {
    case "$1" in
        *.jsonl.gz) echo 6 ;; *.csv.gz) echo 7 ;; *.jsonl) echo 0 ;; *.json) echo 1 ;;
        *.csv) echo 2 ;; *.tsv) echo 3 ;; *.parquet) echo 4 ;; *.arrow) echo 5 ;; *) echo - ;;
    esac
}
while IFS= read -r -d '' f; do
    t="$(type_of "$f")"
    [ "$t" = - ] && continue
    small "$f" || continue
    name="$(basename "$f")"
    byte=$(( $(format_of "$name") * 8 + t ))
    { printf "\\$(printf '%03o' "$byte")"; cat "$f"; } > "$corpus/dataset/$name"
done < <(find "$root/fixtures/data" -type f -print0)

# checkpoint: config.json, then the safetensors header alone (the harness adds the length prefix
# and a sparse data section).
for d in "$root"/fixtures/models/*/; do
    st="$d/model.safetensors"
    [ -f "$d/config.json" ] && [ -f "$st" ] || continue
    n="$(od -An -tu8 -N8 "$st" | tr -d ' ')"
    { cat "$d/config.json"; printf '%s' "$sep"; head -c "$((8 + n))" "$st" | tail -c "$n"; } \
        > "$corpus/checkpoint/$(basename "$d")"
done

# tokenizer: tokenizer.json, tokenizer_config.json, a text.
for d in "$root"/fixtures/models/*/; do
    [ -f "$d/tokenizer.json" ] || continue
    { cat "$d/tokenizer.json"; printf '%s' "$sep"; cat "$d/tokenizer_config.json"; printf '%s' "$sep"
      printf 'Hello <|im_end|> w\xc3\xb6rld\n\tcode()'; } > "$corpus/tokenizer/$(basename "$d")"
done

# chat_template: each template, then a conversation (the templates take the conversations of
# conversations.jsonl in turn).
mapfile -t conversations < "$root/fixtures/templates/conversations.jsonl"
i=0
for t in "$root"/fixtures/templates/trl/*.jinja "$root"/fixtures/models/*/chat_template.jinja; do
    small "$t" || continue
    c="${conversations[$((i % ${#conversations[@]}))]}"
    i=$((i + 1))
    name="$(basename "$(dirname "$t")")-$(basename "$t" .jinja)"
    { cat "$t"; printf '%s' "$sep"; printf '%s' "$c"; } > "$corpus/chat_template/$name"
done

# gguf: the files the export tests hold the writer to.
for g in "$root"/fixtures/gguf/*.gguf; do
    small "$g" && cp "$g" "$corpus/gguf/"
done

# lock, record: no fixture holds one (runs write them); fuzz/seeds has a small one each,
# which the replay test reads too.
cp "$root"/fuzz/seeds/lock/* "$corpus/lock/"
cp "$root"/fuzz/seeds/record/* "$corpus/record/"

for d in "$corpus"/*/; do
    printf '%-14s %3d files\n' "$(basename "$d")" "$(find "$d" -type f | wc -l)"
done

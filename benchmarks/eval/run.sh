#!/usr/bin/env bash
# Reproduce benchmarks/RESULTS.md: every method and sweep on biography, HotpotQA and NIAH, then the page.
#
#   benchmarks/eval/run.sh                  # 100 questions per dataset, 1 torch thread (CPU, several hours)
#   N=20 THREADS=2 benchmarks/eval/run.sh   # quicker, noisier
#   DATASETS="biography" benchmarks/eval/run.sh
#
# Each run writes benchmarks/eval/<dataset>.json (+ .md table, PNG plots). Runs already present are kept;
# delete a JSON file to redo it. The page is rebuilt from whatever JSON files exist.
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${N:-100}
THREADS=${THREADS:-1}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-24}
ADAPTER=${ADAPTER:-default}
DATASETS=${DATASETS:-biography hotpotqa niah}
METHODS=full_recompute,no_recompute,closed_book,kv_packet,cacheblend:0.1,cacheblend:0.15,cacheblend:0.3,cacheblend:0.5,epic:16,epic:32,epic:64

for dataset in $DATASETS; do
  out=benchmarks/eval/$dataset.json
  [ -f "$out" ] && { echo "keeping $out"; continue; }
  kvpacket eval --dataset "$dataset" --methods "$METHODS" --n "$N" --max-new-tokens "$MAX_NEW_TOKENS" \
    --threads "$THREADS" --adapter "$ADAPTER" --json "$out" --plot
done

notes=()
[ -f benchmarks/eval/NOTES.md ] && notes=(--notes benchmarks/eval/NOTES.md)
python -m kvpacket_rag.evaluation.report benchmarks/eval/*.json "${notes[@]}" --out benchmarks/RESULTS.md

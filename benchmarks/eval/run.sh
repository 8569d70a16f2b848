#!/usr/bin/env bash
# Reproduce benchmarks/RESULTS.md: every method on biography, HotpotQA and NIAH, the CacheBlend/EPIC
# sweeps, kv_packet from int8/int4 packets, then the page.
#
#   benchmarks/eval/run.sh                      # 100 questions per dataset, 1 torch thread (CPU, several hours)
#   N=20 SWEEP_N=10 SWEEP_N_NIAH=10 THREADS=2 benchmarks/eval/run.sh   # quicker, noisier
#   DATASETS="biography" benchmarks/eval/run.sh
#
# Per dataset it writes benchmarks/eval/<dataset>.json (main methods, N questions), <dataset>_sweeps.json (the
# other CacheBlend/EPIC settings, SWEEP_N questions, SWEEP_N_NIAH for NIAH), each with a .md table and PNG plots; biography also gets _int8/_int4 runs of kv_packet. Runs already
# present are kept; delete a JSON file to redo it; an interrupted run resumes from its .partial.jsonl. The page
# is rebuilt from whatever JSON files exist.
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${N:-100}
SWEEP_N=${SWEEP_N:-100}
SWEEP_N_NIAH=${SWEEP_N_NIAH:-20}  # NIAH: ~45 s per question for the 5 settings on 1 CPU thread
THREADS=${THREADS:-1}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-24}
ADAPTER=${ADAPTER:-default}
DATASETS=${DATASETS:-biography hotpotqa niah}
METHODS=full_recompute,no_recompute,closed_book,kv_packet,cacheblend:0.15,epic:32
SWEEPS=cacheblend:0.1,cacheblend:0.3,cacheblend:0.5,epic:16,epic:64

evaluate() {  # OUT N METHODS [extra args]
  local out=benchmarks/eval/$1.json n=$2 methods=$3; shift 3
  [ -f "$out" ] && { echo "keeping $out"; return; }
  kvpacket eval --dataset "$dataset" --methods "$methods" --n "$n" --max-new-tokens "$MAX_NEW_TOKENS" \
    --threads "$THREADS" --adapter "$ADAPTER" --json "$out" --plot "$@"
}

for dataset in $DATASETS; do
  evaluate "$dataset" "$N" "$METHODS"
  # the committed biography.json already holds the sweeps (at 100 questions)
  sweep_n=$SWEEP_N; [ "$dataset" = niah ] && sweep_n=$SWEEP_N_NIAH
  grep -q '"epic:64"' "benchmarks/eval/$dataset.json" || evaluate "${dataset}_sweeps" "$sweep_n" "$SWEEPS"
done
if [[ " $DATASETS " == *" biography "* ]]; then
  dataset=biography
  for quantization in int8 int4; do
    evaluate "biography_$quantization" "$N" kv_packet --quantization "$quantization"
  done
fi

# the shipped adapter read both ways (kv_packet; kv_packet_first_exact, the default) against bare packets (full
# recompute rerun as the reference); NIAH and HotpotQA on their first 30 questions
for spec in biography:$N niah:${SHIPPED_N:-30} hotpotqa:${SHIPPED_N:-30}; do
  dataset=${spec%%:*}
  evaluate "${dataset}_shipped" "${spec##*:}" no_recompute,kv_packet,kv_packet_first_exact
done

# SQuAD, the domain no adapter trains on: the shipped adapter against CacheBlend 15 %
dataset=squad
evaluate squad_shipped "$N" no_recompute,kv_packet,kv_packet_first_exact,cacheblend:0.15

notes=()
[ -f benchmarks/eval/NOTES.md ] && notes=(--notes benchmarks/eval/NOTES.md)
python -m kvpacket_rag.evaluation.report benchmarks/eval/*.json "${notes[@]}" --out benchmarks/RESULTS.md

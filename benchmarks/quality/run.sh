#!/usr/bin/env bash
# Reproduce benchmarks/quality/: the demo's suggested questions and the quality frontier of the adapter designs
# on a validation draw (test split, seed 1; the reported questions of RESULTS.md use seed 0).
#
#   benchmarks/quality/run.sh            # 2 torch threads; about 2 hours on a 2-core CPU
#
# Delete a result file to measure it again; the frontier keeps the datasets already in its JSON.
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296 MALLOC_TOP_PAD_=268435456
OUT=benchmarks/quality
PY=${PYTHON:-.venv/bin/python}
PAPER=benchmarks/adapter/candidates/smollm2-135m-instruct-stage3.safetensors  # position-0 packets, the paper's layout
STAGE9=benchmarks/adapter/candidates/smollm2-135m-instruct-stage9.safetensors  # shipped before stage 10

# the demo with the shipped adapter (stage 10), read the default way and as packets
[ -f $OUT/demo_shipped.json ] || $PY $OUT/demo_questions.py --adapter default --json $OUT/demo_shipped.json
[ -f $OUT/demo_shipped_packets.json ] || $PY $OUT/demo_questions.py --adapter default --method kv_packet --json $OUT/demo_shipped_packets.json
[ -f $OUT/demo_stage9.json ] || $PY $OUT/demo_questions.py --adapter $STAGE9 --method kv_packet --json $OUT/demo_stage9.json
$PY $OUT/frontier.py --sets biography:20 niah:10 squad:15 hotpotqa:10 --threads 2 \
  --variants kv_packet=benchmarks/adapter/candidates/smollm2-135m-instruct-stage4.safetensors paper-layout=$PAPER bare+preamble=none+preamble \
  --baselines no_recompute cacheblend:0.15 --json $OUT/frontier.json
# stage 6 against stage 7 (shipped before stage 9), with the baselines
$PY $OUT/frontier.py --sets squad:15 biography:20 hotpotqa:10 niah:10 --threads 2 \
  --variants stage7=benchmarks/adapter/candidates/smollm2-135m-instruct-stage7.safetensors kv_packet=benchmarks/adapter/candidates/smollm2-135m-instruct-stage6.safetensors \
  --baselines no_recompute cacheblend:0.15 --json $OUT/frontier_stage7.json
$PY $OUT/frontier.py --sets biography:50 --threads 2 \
  --variants stage7=benchmarks/adapter/candidates/smollm2-135m-instruct-stage7.safetensors \
  stage6=benchmarks/adapter/candidates/smollm2-135m-instruct-stage6.safetensors --baselines no_recompute \
  --json $OUT/frontier_biography50.json
# stage 9 against stage 7, with the baselines
$PY $OUT/frontier.py --sets squad:15 biography:20 hotpotqa:10 niah:10 --threads 2 \
  --variants stage9=$STAGE9 stage7=benchmarks/adapter/candidates/smollm2-135m-instruct-stage7.safetensors \
  --baselines no_recompute cacheblend:0.15 --json $OUT/frontier_stage9.json
[ -f $OUT/demo_paper.json ] || $PY $OUT/demo_questions.py --adapter $PAPER --json $OUT/demo_paper.json
# reading the first chunk exactly (kv_packet_first_exact): stage 9 untrained, and a candidate trained for it
$PY $OUT/frontier.py --sets squad:15 biography:20 hotpotqa:10 niah:10 --threads 2 \
  --variants stage9=$STAGE9 stage9-first-exact=$STAGE9@first-exact \
  first-exact=benchmarks/adapter/experiments/first_exact/first-exact.safetensors@first-exact \
  --baselines no_recompute --json $OUT/frontier_first_exact.json
$PY $OUT/frontier.py --sets squad:30 biography:30 hotpotqa:30 niah:30 --threads 2 \
  --variants stage9=$STAGE9 stage9-first-exact=$STAGE9@first-exact --baselines --json $OUT/frontier_first_exact30.json
$PY $OUT/frontier.py --sets squad:30 biography:30 hotpotqa:30 --threads 2 \
  --variants first-exact-trained=benchmarks/adapter/experiments/first_exact/first-exact.safetensors@first-exact \
  --baselines --json $OUT/frontier_first_exact_trained30.json
[ -f $OUT/demo_stage9_first_exact.json ] || $PY $OUT/demo_questions.py --adapter $STAGE9 --json $OUT/demo_stage9_first_exact.json
# stage 10 (shipped: the same kind of epoch with a context loss), read with the first chunk exact
$PY $OUT/frontier.py --sets squad:30 biography:30 hotpotqa:30 --threads 2 \
  --variants context-loss=default@first-exact --baselines --json $OUT/frontier_context_loss30.json
$PY $OUT/frontier.py --sets biography:90 squad:90 --threads 2 \
  --variants stage9-first-exact=$STAGE9@first-exact context-loss=default@first-exact --baselines \
  --json $OUT/frontier_context_loss90.json
# stage 10 + a second context-loss epoch (not kept)
$PY $OUT/frontier.py --sets biography:90 squad:90 --threads 2 \
  --variants second-epoch=benchmarks/adapter/experiments/context_loss2/context2.safetensors@first-exact --baselines \
  --json $OUT/frontier_context_loss2_90.json
$PY $OUT/gather.py  # frontier_all.md and .png: every design of the runs above

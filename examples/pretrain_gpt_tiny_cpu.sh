#!/bin/bash
# Parallel pretraining on one CPU machine: torchrun starts 4 gloo processes, laid out as
# tensor-parallel 2 x pipeline-parallel 2, training the demo's small GPT (4 layers, hidden 256,
# seq 256) with random-LTD on the demo corpus.
#
#   python examples/tiny_cpu_demo.py          # once: builds demo_output/ (data, vocabulary)
#   bash examples/pretrain_gpt_tiny_cpu.sh    # TP2 x PP2, 40 iterations
#   NPROC=2 TP=2 PP=1 bash examples/pretrain_gpt_tiny_cpu.sh --train-iters 10
#
# Flags given on the command line are appended and override the defaults below (the last
# occurrence of a flag wins). Environment:
#   NPROC        processes (default 4); data parallelism is NPROC / (TP x PP)
#   TP, PP       tensor / pipeline parallel sizes (default 2, 2)
#   DEMO_DIR     the demo's output directory (default demo_output in the repository)
#   DATA_PATH, VOCAB_FILE, MERGE_FILE   override the demo's data and vocabulary
#   SAVE_DIR     checkpoints (default $DEMO_DIR/checkpoints_tp${TP}_pp${PP}); a rerun resumes
#   MASTER_PORT  rendezvous port (default 6000 in run_torchrun.sh)
# Each process runs one thread (OMP_NUM_THREADS=1): on a 2-core machine 4 processes share the
# cores, so this is slower than one process; it shows the layouts, not a speed-up.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEMO_DIR=${DEMO_DIR:-$ROOT/demo_output}
DATA_PATH=${DATA_PATH:-$DEMO_DIR/data/stdlib_text_document}
VOCAB_FILE=${VOCAB_FILE:-$DEMO_DIR/vocab/vocab.json}
MERGE_FILE=${MERGE_FILE:-$DEMO_DIR/vocab/merges.txt}
NPROC=${NPROC:-4}
TP=${TP:-2}
PP=${PP:-2}
SAVE_DIR=${SAVE_DIR:-$DEMO_DIR/checkpoints_tp${TP}_pp${PP}}

for f in "$DATA_PATH.bin" "$DATA_PATH.idx" "$VOCAB_FILE" "$MERGE_FILE"; do
    if [[ ! -f "$f" ]]; then
        echo "pretrain_gpt_tiny_cpu.sh: $f is missing; run 'python examples/tiny_cpu_demo.py'" \
             "first (it builds demo_output/), or set DATA_PATH, VOCAB_FILE and MERGE_FILE" >&2
        exit 2
    fi
done

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export GPUS_PER_NODE=$NPROC

exec bash "$ROOT/examples/run_torchrun.sh" "$ROOT/pretrain_gpt.py" \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
    --distributed-backend gloo --device cpu \
    --num-layers 4 --hidden-size 256 --num-attention-heads 4 \
    --seq-length 256 --max-position-embeddings 256 \
    --micro-batch-size 4 --global-batch-size 16 \
    --train-iters 40 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 4 \
    --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 \
    --hidden-dropout 0.0 --attention-dropout 0.0 \
    --random-ltd --random-ltd-start 64 --random-ltd-step 16 --random-ltd-schedule-steps 28 \
    --data-path "$DATA_PATH" --split 98,2,0 \
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE" \
    --make-vocab-size-divisible-by 64 \
    --log-interval 5 --eval-interval 20 --eval-iters 2 \
    --save "$SAVE_DIR" --load "$SAVE_DIR" --save-interval 20 \
    --num-workers 0 \
    "$@"

#!/bin/bash
#SBATCH --job-name=preprocess-pile
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=32G
#SBATCH --time=12:00:00
#SBATCH --output=%x-%A_%a.out
#
# Tokenize the PILE's training shards (00.jsonl.zst .. 29.jsonl.zst) in parallel, one job per
# shard, then concatenate them with tools/merge_datasets.py into one dataset: the same bytes as
# one run of tools/preprocess_data.py over the 30 files in order.
#
#   bash examples/preprocess_pile.sh                  # SLURM: array of 30 jobs + a merge job
#   LAUNCHER=local PARALLEL=4 bash examples/preprocess_pile.sh   # this machine, 4 at a time
#   DRY_RUN=1 bash examples/preprocess_pile.sh        # print the commands, run nothing
#   bash examples/preprocess_pile.sh -- --skip-bad-lines   # extra preprocess_data.py flags
#
# With SLURM the script submits itself twice: an array with one task per shard ("shard" mode,
# --cpus-per-task workers each, at most MAX_PARALLEL at once) and a merge job that starts when
# every shard succeeded (afterok). A shard whose dataset exists is skipped, so rerunning after a
# failure or preemption redoes only what is missing (temporaries of killed runs are removed).
# Variables (environment):
#   PILE_DIR    directory of the input shards (default data/pile/train); SHARD_GLOB the files
#               in it (default '*.jsonl.zst'), processed in sorted order
#   OUT_DIR     output directory (default data/pile-gpt2): shards/pile_<NN>_text_document.*
#               per shard, then <OUT_DIR>/pile_text_document.bin/.idx
#   TOKENIZER_TYPE (default GPT2BPETokenizer), VOCAB_FILE (gpt2-vocab.json), MERGE_FILE
#               (gpt2-merges.txt), TOKENIZER_MODEL (SentencePiece/HF types)
#   WORKERS     --workers per shard (default: SLURM_CPUS_PER_TASK, else 1 = the fast
#               tokenizer's own threads on every core)
#   LAUNCHER    slurm (default when sbatch exists) | local
#   PARALLEL    local: shards at once (default 1); MAX_PARALLEL slurm: array tasks at once
#               (default 30)
#   DRY_RUN     1: print the commands instead of running or submitting them
set -euo pipefail

if [[ -n "${MEGATRON_LTD_ROOT:-}" ]]; then
    ROOT="$MEGATRON_LTD_ROOT"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/../tools/preprocess_data.py" ]]; then
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else  # sbatch ran a spooled copy of this file: use the submission directory
    ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
fi
SCRIPT="$ROOT/examples/preprocess_pile.sh"
PYTHON=${PYTHON:-python}

MODE=auto
if [[ $# -gt 0 && "$1" != "--" ]]; then
    MODE=$1
    shift
fi
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")

PILE_DIR=${PILE_DIR:-data/pile/train}
SHARD_GLOB=${SHARD_GLOB:-*.jsonl.zst}
OUT_DIR=${OUT_DIR:-data/pile-gpt2}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-GPT2BPETokenizer}
PARALLEL=${PARALLEL:-1}
[[ "${DRY_RUN:-0}" == 1 ]] && PARALLEL=1  # the printed commands in order
MAX_PARALLEL=${MAX_PARALLEL:-30}
if [[ -z "${LAUNCHER:-}" ]]; then
    LAUNCHER=local
    command -v sbatch >/dev/null 2>&1 && LAUNCHER=slurm
fi

TOKENIZER_ARGS=(--tokenizer-type "$TOKENIZER_TYPE")
[[ -n "${VOCAB_FILE:-}" || "$TOKENIZER_TYPE" == GPT2BPETokenizer ]] &&
    TOKENIZER_ARGS+=(--vocab-file "${VOCAB_FILE:-gpt2-vocab.json}")
[[ -n "${MERGE_FILE:-}" || "$TOKENIZER_TYPE" == GPT2BPETokenizer ]] &&
    TOKENIZER_ARGS+=(--merge-file "${MERGE_FILE:-gpt2-merges.txt}")
[[ -n "${TOKENIZER_MODEL:-}" ]] && TOKENIZER_ARGS+=(--tokenizer-model "$TOKENIZER_MODEL")

shopt -s nullglob
SHARDS=("$PILE_DIR"/$SHARD_GLOB)
shopt -u nullglob
if [[ ${#SHARDS[@]} -eq 0 ]]; then
    echo "preprocess_pile.sh: no files match $PILE_DIR/$SHARD_GLOB (set PILE_DIR)" >&2
    exit 2
fi

run() {  # the command, or with DRY_RUN=1 the command as one shell-quoted line
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@" | sed 's/ $//'
        echo
    else
        "$@"
    fi
}

shard_prefix() {  # 00.jsonl.zst -> $OUT_DIR/shards/pile_00
    local name
    name=$(basename "$1")
    echo "$OUT_DIR/shards/pile_${name%%.*}"
}

preprocess_shard() {  # index into SHARDS
    local input=${SHARDS[$1]} prefix
    prefix=$(shard_prefix "$input")
    if [[ -f "${prefix}_text_document.idx" && "${DRY_RUN:-0}" != 1 ]]; then
        echo "preprocess_pile.sh: ${prefix}_text_document exists, skipped" >&2
        return 0
    fi
    run mkdir -p "$OUT_DIR/shards"
    run "$PYTHON" "$ROOT/tools/preprocess_data.py" --input "$input" --output-prefix "$prefix" \
        "${TOKENIZER_ARGS[@]}" --json-keys text --append-eod \
        --workers "${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}" "${EXTRA[@]}"
}

merge() {
    run "$PYTHON" "$ROOT/tools/merge_datasets.py" --input "$OUT_DIR/shards" \
        --output-prefix "$OUT_DIR/pile_text_document"
}

case "$MODE" in
    shard)  # one SLURM array task
        preprocess_shard "${SLURM_ARRAY_TASK_ID:?shard mode runs as a SLURM array task}" ;;
    merge)
        merge ;;
    auto | submit | local)
        if [[ "$MODE" == local || "$LAUNCHER" == local ]]; then
            failed=0
            pids=()
            for i in "${!SHARDS[@]}"; do
                while [[ $(jobs -rp | wc -l) -ge $PARALLEL ]]; do
                    wait -n || failed=1
                done
                preprocess_shard "$i" &
                pids+=($!)
            done
            for pid in "${pids[@]}"; do
                wait "$pid" || failed=1
            done
            if [[ $failed -ne 0 ]]; then
                echo "preprocess_pile.sh: a shard failed (see above); not merging. Rerun to" \
                     "redo the missing shards." >&2
                exit 1
            fi
            merge
        else
            last=$((${#SHARDS[@]} - 1))
            sbatch_args=(--parsable "--array=0-$last%$MAX_PARALLEL")
            if [[ "${DRY_RUN:-0}" == 1 ]]; then
                run sbatch "${sbatch_args[@]}" "$SCRIPT" shard -- "${EXTRA[@]}"
                run sbatch --dependency=afterok:JOBID --cpus-per-task=2 "$SCRIPT" merge
            else
                export PILE_DIR SHARD_GLOB OUT_DIR TOKENIZER_TYPE PYTHON MEGATRON_LTD_ROOT="$ROOT"
                export VOCAB_FILE MERGE_FILE TOKENIZER_MODEL WORKERS  # those set, if any
                job=$(sbatch "${sbatch_args[@]}" "$SCRIPT" shard -- "${EXTRA[@]}")
                merge_job=$(sbatch --parsable "--dependency=afterok:${job%%;*}" \
                    --cpus-per-task=2 "$SCRIPT" merge)
                echo "submitted shards as job ${job%%;*} (${#SHARDS[@]} array tasks), the" \
                     "merge as job $merge_job"
            fi
        fi ;;
    *)
        echo "preprocess_pile.sh: unknown mode '$MODE' (submit, local, shard, merge)" >&2
        exit 2 ;;
esac

#!/bin/bash
# Shared by examples/finetune_{mnli,qqp,race}.sh (sourced after they set ROOT, SCRIPT_NAME and
# TASK; not run on its own): the paper's finetuning of TASK (tasks/finetune_presets.py) for every
# pretrained checkpoint and seed, one run after another in this allocation (or on this node),
# through tasks/run_finetune_seeds.py, which then writes the median / best table to
# OUTPUT_DIR/finetune_results.{md,csv}. Runs that finished before are skipped.
#
# Variables (environment):
#   CHECKPOINTS  (required) pretrained BERT checkpoints, space-separated NAME=DIR (e.g.
#                "baseline=checkpoints/bert-dense random-ltd=checkpoints/bert-ltd-2"), or a DIR
#   DATA_ROOT    directory with GLUE's MNLI/ and QQP/ and RACE/ (default /data/finetune); see
#                tasks/finetune_presets.py for where to get them
#   SEEDS        seeds (default 1234-1238; "1234,1236" or ranges)
#   OUTPUT_DIR   runs, logs and tables (default finetune-runs/ in the repository)
#   MODEL        bert-large (default: the paper's 24 layers, hidden 1024, 16 heads, seq 512) or
#                checkpoint (the shape and tokenizer from each checkpoint: --use-checkpoint-args)
#   VOCAB_FILE   BERT WordPiece vocabulary (default DATA_ROOT/bert-large-uncased-vocab.txt;
#                with MODEL=checkpoint the checkpoint's unless set); TOKENIZER_TYPE
#                BertWordPieceLowerCase (default) or BertWordPieceCase
#   TP, PP       tensor / pipeline parallel sizes (default 1, 1); DP = GPUs / (TP x PP) must
#                divide the task's global batch (MNLI/QQP 128, RACE 32)
#   MICRO_BATCH  per-GPU micro-batch (default: the preset's, MNLI/QQP 8, RACE 4, halved until it
#                divides global batch / DP)
#   PRECISION    fp16 (default, as Megatron's finetune examples) or bf16
#   LAUNCHER     slurm (default inside a SLURM job) or torchrun (one node; GPUS_PER_NODE)
#   DRY_RUN      1: print every run's launch command and check its flags for the launcher's
#                process count (slurm outside a job: the 8 tasks of the #SBATCH lines) with
#                tasks/main.py's parser; nothing starts and missing inputs are warnings
#   PREEMPTIBLE  1 (default with LAUNCHER=slurm): each run saves to OUTPUT_DIR/<checkpoint>/
#                <task>/seed<S>/checkpoints, so SIGUSR1 (#SBATCH --signal=B:USR1@300, or a
#                preemption) saves the running finetune, stops the series and requeues the job,
#                which resumes it; the checkpoints stay (a BERT-large run with its optimizer
#                state is about 4 GB). 0: nothing saved, a stopped run starts over.
#                REQUEUE=0: stop without requeueing.
#   PYTHON       interpreter (default python3)
# Extra arguments go to every tasks/main.py run (after the presets', so they win).

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "finetune_common.sh is sourced by examples/finetune_{mnli,qqp,race}.sh; run one of" \
         "those" >&2
    exit 2
fi
die() { echo "$SCRIPT_NAME: $*" >&2; exit 2; }
# shellcheck source=examples/launch_common.sh
source "$ROOT/examples/launch_common.sh"  # precision_args, default_launcher, require_inputs
PYTHON=${PYTHON:-python3}
export PYTHON

# ---- the task's preset: global batch, default micro-batch, data files -----------------------
PRESET=$(PYTHONPATH="$ROOT" "$PYTHON" - "$TASK" <<'PY'
import sys
from tasks.finetune_presets import PRESETS
p = PRESETS[sys.argv[1]]
print(p.global_batch_size, p.micro_batch_size, *p.train, *p.valid)
PY
) || die "could not read tasks/finetune_presets.py with $PYTHON"
read -r GLOBAL_BATCH DEFAULT_MICRO DATA_FILES <<< "$PRESET"

# ---- layout: the launcher's process count, DP, a micro-batch that divides the batch ---------
LAUNCHER=${LAUNCHER:-$(default_launcher)}
case "$LAUNCHER" in
    slurm) if [[ -z "${SLURM_JOB_ID:-}" ]]; then export SLURM_NTASKS=${SLURM_NTASKS:-8}; fi
           WORLD=${SLURM_NTASKS:-} ;;
    torchrun) if [[ -z "${GPUS_PER_NODE:-}" ]]; then
                  GPUS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
                  [[ "$GPUS_PER_NODE" -ge 1 ]] 2>/dev/null || GPUS_PER_NODE=1
              fi
              export GPUS_PER_NODE
              WORLD=$GPUS_PER_NODE ;;
    *) die "LAUNCHER must be slurm or torchrun, got '$LAUNCHER'" ;;
esac
PREEMPTIBLE=${PREEMPTIBLE:-$([[ "$LAUNCHER" == slurm ]] && echo 1 || echo 0)}
[[ "$PREEMPTIBLE" == 0 || "$PREEMPTIBLE" == 1 ]] || die "PREEMPTIBLE must be 0 or 1, got" \
    "'$PREEMPTIBLE'"
TP=${TP:-1}
PP=${PP:-1}
for v in TP PP; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
MICRO_ARGS=()
if [[ "$WORLD" =~ ^[1-9][0-9]*$ ]]; then
    (( WORLD % (TP * PP) == 0 )) || die "$WORLD GPUs are not divisible by TP $TP x PP $PP"
    DP=$(( WORLD / (TP * PP) ))
    (( GLOBAL_BATCH % DP == 0 )) || die "$TASK's global batch $GLOBAL_BATCH is not divisible" \
        "by DP $DP ($WORLD GPUs / (TP $TP x PP $PP)); use a GPU count that divides it"
    if [[ -z "${MICRO_BATCH:-}" ]]; then
        MICRO_BATCH=$DEFAULT_MICRO
        while (( (GLOBAL_BATCH / DP) % MICRO_BATCH != 0 )); do MICRO_BATCH=$((MICRO_BATCH / 2)); done
    fi
fi
MICRO_BATCH=${MICRO_BATCH:-$DEFAULT_MICRO}
[[ "$MICRO_BATCH" =~ ^[1-9][0-9]*$ ]] || die "MICRO_BATCH must be a positive integer, got" \
    "'$MICRO_BATCH'"

# ---- inputs ----------------------------------------------------------------------------------
[[ -n "${CHECKPOINTS:-}" ]] || die "set CHECKPOINTS to the pretrained BERT checkpoint(s)," \
    "e.g. CHECKPOINTS=\"baseline=checkpoints/bert-dense random-ltd=checkpoints/bert-ltd-2\""
read -r -a CHECKPOINT_LIST <<< "$CHECKPOINTS"
DATA_ROOT=${DATA_ROOT:-/data/finetune}
MODEL=${MODEL:-bert-large}
case "$MODEL" in bert-large|checkpoint) ;; *) die "MODEL must be bert-large or checkpoint" ;; esac
TOKENIZER_ARGS=()
if [[ "$MODEL" == bert-large || -n "${VOCAB_FILE:-}" ]]; then
    VOCAB_FILE=${VOCAB_FILE:-$DATA_ROOT/bert-large-uncased-vocab.txt}
    TOKENIZER_ARGS=(--tokenizer-type "${TOKENIZER_TYPE:-BertWordPieceLowerCase}"
                    --vocab-file "$VOCAB_FILE")
fi
MISSING=()
for item in $DATA_FILES; do
    [[ -e "$DATA_ROOT/$TASK/$item" ]] || MISSING+=("$DATA_ROOT/$TASK/$item")
done
for item in "${CHECKPOINT_LIST[@]}"; do
    [[ -d "${item#*=}" ]] || MISSING+=("${item#*=}")
done
if [[ ${#TOKENIZER_ARGS[@]} -gt 0 && ! -f "$VOCAB_FILE" ]]; then MISSING+=("$VOCAB_FILE"); fi
if [[ ${#MISSING[@]} -gt 0 ]]; then
    MESSAGE="$SCRIPT_NAME: not found: ${MISSING[*]} (set DATA_ROOT to the directory holding"
    MESSAGE="$MESSAGE $TASK/, CHECKPOINTS to the pretrained checkpoints and VOCAB_FILE; see"
    MESSAGE="$MESSAGE tasks/finetune_presets.py)"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "warning: $MESSAGE" >&2; else
        echo "$MESSAGE" >&2; exit 2; fi
fi
precision_args || die "PRECISION must be fp16 or bf16, got '${PRECISION}'"

RUNNER_ARGS=(--task "$TASK" --data-root "$DATA_ROOT" --seeds "${SEEDS:-1234-1238}"
             --output-dir "${OUTPUT_DIR:-$ROOT/finetune-runs}" --launcher "$LAUNCHER"
             --model "$MODEL" --micro-batch-size "$MICRO_BATCH")
for item in "${CHECKPOINT_LIST[@]}"; do
    RUNNER_ARGS+=(--checkpoint "$item")
done
if [[ "${DRY_RUN:-0}" == 1 ]]; then RUNNER_ARGS+=(--dry-run); fi
if [[ "$PREEMPTIBLE" == 1 ]]; then RUNNER_ARGS+=(--save-checkpoints); fi
TASK_ARGS=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
           "${PRECISION_ARGS[@]}" "${TOKENIZER_ARGS[@]}" --num-workers 2 --log-interval 10
           "$@")
exec "$PYTHON" "$ROOT/tasks/run_finetune_seeds.py" "${RUNNER_ARGS[@]}" -- "${TASK_ARGS[@]}"

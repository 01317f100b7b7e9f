#!/bin/bash
#SBATCH --job-name=gpt-causal-lm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --time=1-00:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@300   # save and requeue before the time limit: examples/run_slurm.sbatch
#SBATCH --requeue
#SBATCH --open-mode=append
#
# GPT-2 causal-LM finetuning on PTB, WikiText-2 or WikiText-103 with random-LTD, TokenBypass or
# neither (the random-LTD paper's Appendix D.4: global batch 32, constant lr 5e-5, the
# checkpoint's sequence length), through tasks/causal_lm/finetune.py. The global batch of 32
# is kept on any GPU count (micro-batch MICRO_BATCH per GPU; 8 GPUs x 4 = one micro-batch per
# step); rerunning the same command after a preemption resumes from SAVE, and under sbatch
# the job saves and requeues itself before its time limit (examples/run_slurm.sbatch).
#
#   sbatch examples/finetune_gpt_causal_lm.sh                          # PTB, random-LTD 128
#   TASK=wikitext103 LTD_START=256 sbatch examples/finetune_gpt_causal_lm.sh
#   METHOD=baseline TASK=wikitext2 sbatch examples/finetune_gpt_causal_lm.sh
#   METHOD=tokenbypass sbatch examples/finetune_gpt_causal_lm.sh
#   LAUNCHER=torchrun GPUS_PER_NODE=1 bash examples/finetune_gpt_causal_lm.sh   # one GPU
#   DRY_RUN=1 LAUNCHER=torchrun bash examples/finetune_gpt_causal_lm.sh        # print it
#   bash examples/finetune_gpt_causal_lm.sh --epochs 3 -- --log-interval 50   # extra flags
#
# Arguments after the script name go to finetune.py (its own flags, then '--' and
# pretrain_gpt.py flags). Variables (environment):
#   TASK        ptb (default) | wikitext2 | wikitext103: the files read from TEXT_DIR and the
#               --format (ptb: ptb.{train,valid}.txt; wikitext*: wiki.{train,valid}.raw)
#   TEXT_DIR    the raw text files (default data/$TASK; see README "GPT causal-LM finetuning")
#   DATA_DIR    the tokenized cache, shared by all nodes (default $TEXT_DIR/tokenized)
#   PRETRAINED  the GPT checkpoint (default checkpoints/gpt2-medium, made by
#               tools/convert_hf.py import --make-vocab-size-divisible-by 1 from Hugging
#               Face's gpt2-medium)
#   METHOD      random-ltd (default) | tokenbypass | baseline
#   LTD_START   kept tokens at the start (default 128; the paper also runs 256 and 512)
#   FULL_AT     fraction of the run after which all tokens are kept (default: the paper's,
#               0.8 for PTB and 0.7 for WikiText)
#   EPOCHS      passes over the training text (default 2); SEED (default 1234)
#   MICRO_BATCH per-GPU micro-batch (default 4)
#   SAVE        output checkpoint directory (default checkpoints/gpt2-$TASK-$METHOD[-$LTD_START])
#   PRECISION   fp32 (default) | bf16 | fp16
#   LAUNCHER    slurm (inside a SLURM job) | torchrun (otherwise); MASTER_PORT as the launchers
#   DRY_RUN     1: print the launcher command instead of running it
set -euo pipefail

if [[ -n "${MEGATRON_LTD_ROOT:-}" ]]; then
    ROOT="$MEGATRON_LTD_ROOT"
elif [[ -f "$(dirname "${BASH_SOURCE[0]}")/../pretrain_gpt.py" ]]; then
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
else  # sbatch ran a spooled copy of this file: use the submission directory
    ROOT="${SLURM_SUBMIT_DIR:-$PWD}"
fi
SCRIPT_NAME=finetune_gpt_causal_lm.sh
if [[ ! -f "$ROOT/examples/launch_common.sh" ]]; then
    echo "$SCRIPT_NAME: $ROOT/examples/launch_common.sh not found: submit from the repository" \
         "root or set MEGATRON_LTD_ROOT" >&2
    exit 2
fi
# shellcheck source=examples/launch_common.sh
source "$ROOT/examples/launch_common.sh"

TASK=${TASK:-ptb}
case "$TASK" in
    ptb) FORMAT=ptb; TRAIN_FILE=ptb.train.txt; VALID_FILE=ptb.valid.txt ;;
    wikitext2|wikitext103) FORMAT=wikitext; TRAIN_FILE=wiki.train.raw; VALID_FILE=wiki.valid.raw ;;
    *) echo "$SCRIPT_NAME: TASK=$TASK: expected ptb, wikitext2 or wikitext103" >&2; exit 2 ;;
esac
TEXT_DIR=${TEXT_DIR:-data/$TASK}
DATA_DIR=${DATA_DIR:-$TEXT_DIR/tokenized}
PRETRAINED=${PRETRAINED:-checkpoints/gpt2-medium}
METHOD=${METHOD:-random-ltd}
LTD_START=${LTD_START:-128}
EPOCHS=${EPOCHS:-2}
SEED=${SEED:-1234}
MICRO_BATCH=${MICRO_BATCH:-4}

LTD_ARGS=()
case "$METHOD" in
    random-ltd) LTD_ARGS=(--random-ltd-start "$LTD_START"); TAG="$METHOD-$LTD_START" ;;
    tokenbypass) LTD_ARGS=(--tokenbypass --random-ltd-start "$LTD_START")
                 TAG="$METHOD-$LTD_START" ;;
    baseline) TAG=baseline ;;
    *) echo "$SCRIPT_NAME: METHOD=$METHOD: expected random-ltd, tokenbypass or baseline" >&2
       exit 2 ;;
esac
if [[ -n "${FULL_AT:-}" ]]; then
    if [[ "$METHOD" == baseline ]]; then
        echo "$SCRIPT_NAME: FULL_AT needs METHOD=random-ltd or tokenbypass" >&2
        exit 2
    fi
    LTD_ARGS+=(--random-ltd-full-at "$FULL_AT")
fi
SAVE=${SAVE:-checkpoints/gpt2-$TASK-$TAG}

PRECISION=${PRECISION:-fp32}
PRECISION_ARGS=()
if [[ "$PRECISION" != fp32 ]] && ! precision_args; then
    echo "$SCRIPT_NAME: PRECISION=$PRECISION: expected fp32, bf16 or fp16" >&2
    exit 2
fi

DATA_PREFIXES=()
HINT="raw $TASK text: see README 'GPT causal-LM finetuning'; checkpoint: tools/convert_hf.py"
require_inputs "$HINT import" \
    "$TEXT_DIR/$TRAIN_FILE" "$TEXT_DIR/$VALID_FILE" \
    "$PRETRAINED/latest_checkpointed_iteration.txt"

# The caller's arguments: finetune.py flags, then '--' and pretrain_gpt.py flags; ours go to
# the matching side of the '--'.
OWN=()
PASS=()
SEEN_SEP=0
for arg in "$@"; do
    if [[ $SEEN_SEP == 0 && "$arg" == "--" ]]; then SEEN_SEP=1; continue; fi
    if [[ $SEEN_SEP == 0 ]]; then OWN+=("$arg"); else PASS+=("$arg"); fi
done

FLAGS=(--train-text "$TEXT_DIR/$TRAIN_FILE" --valid-text "$TEXT_DIR/$VALID_FILE"
       --format "$FORMAT" --pretrained-checkpoint "$PRETRAINED" --save "$SAVE"
       --data-dir "$DATA_DIR" --epochs "$EPOCHS" --seed "$SEED"
       --global-batch-size 32 --micro-batch-size "$MICRO_BATCH" --lr 5e-5
       ${LTD_ARGS[@]+"${LTD_ARGS[@]}"} ${OWN[@]+"${OWN[@]}"}
       -- ${PRECISION_ARGS[@]+"${PRECISION_ARGS[@]}"} ${PASS[@]+"${PASS[@]}"})

LAUNCHER=${LAUNCHER:-$(default_launcher)}
launch "$LAUNCHER" "$ROOT/tasks/causal_lm/finetune.py" "${FLAGS[@]}" || {
    echo "$SCRIPT_NAME: LAUNCHER=$LAUNCHER: expected slurm or torchrun" >&2
    exit 2
}

#!/bin/bash
# Shell functions shared by the pretraining launch scripts (examples/gpt3_common.sh, which the
# GPT-3 scripts source, and examples/pretrain_bert_large.sh): reading DATA_PATH, refusing
# missing inputs, the precision and data-cache flags and handing the flags to the launcher. Not
# run on its own: a script sets ROOT (the repository root) and SCRIPT_NAME (its own name, for
# messages) and then sources this file from "$ROOT/examples".

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "launch_common.sh is sourced by the examples/pretrain_*.sh scripts; run one of those" >&2
    exit 2
fi

# split_data_path: DATA_ARGS (array) from DATA_PATH, which is one prefix or a blend
# "w1 prefix1 w2 prefix2 ..."; DATA_PREFIXES (array): its prefixes without the blend weights.
split_data_path() {
    local item
    if [[ -f "$DATA_PATH.idx" ]]; then  # one prefix (its path may contain spaces)
        DATA_ARGS=("$DATA_PATH")
    else                                # a blend "w1 prefix1 w2 prefix2 ...": split on spaces
        read -r -a DATA_ARGS <<< "$DATA_PATH"
    fi
    DATA_PREFIXES=()
    for item in "${DATA_ARGS[@]}"; do
        if [[ "$item" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then continue; fi  # a weight
        DATA_PREFIXES+=("$item")
    done
}

# require_inputs HINT FILE...: every prefix's .bin/.idx and each FILE must exist. A missing one
# stops the script in one line, "SCRIPT_NAME: not found: ... (HINT)", exit 2 - before any
# process starts; with DRY_RUN=1 the line is a warning and the script goes on.
require_inputs() {
    local hint=$1 prefix f message
    shift
    local missing=()
    for prefix in "${DATA_PREFIXES[@]}"; do
        for f in "$prefix.bin" "$prefix.idx"; do [[ -f "$f" ]] || missing+=("$f"); done
    done
    for f in "$@"; do [[ -f "$f" ]] || missing+=("$f"); done
    [[ ${#missing[@]} -gt 0 ]] || return 0
    message="$SCRIPT_NAME: not found: ${missing[*]} ($hint)"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        echo "warning: $message" >&2
    else
        echo "$message" >&2
        exit 2
    fi
}

# precision_args: PRECISION_ARGS (array) for PRECISION: fp16 (default, with the recipes' loss
# scaling) or bf16; returns 1 for anything else (the caller says so in its own words).
precision_args() {
    case "${PRECISION:-fp16}" in
        fp16) PRECISION_ARGS=(--fp16 --initial-loss-scale 2048 --loss-scale-window 500
                              --hysteresis 2 --min-loss-scale 1) ;;
        bf16) PRECISION_ARGS=(--bf16) ;;
        *) return 1 ;;
    esac
}

# cache_args: CACHE_ARGS (array): --data-cache-path DATA_CACHE_PATH when it is set.
cache_args() {
    CACHE_ARGS=()
    if [[ -n "${DATA_CACHE_PATH:-}" ]]; then
        CACHE_ARGS=(--data-cache-path "$DATA_CACHE_PATH")
    fi
}

# default_launcher: prints slurm inside a SLURM job (SLURM_JOB_ID set), else torchrun.
default_launcher() {
    if [[ -n "${SLURM_JOB_ID:-}" ]]; then echo slurm; else echo torchrun; fi
}

# launch LAUNCHER ENTRY FLAGS...: replace this shell with examples/run_slurm.sbatch (plain srun)
# or examples/run_torchrun.sh (one node) running ENTRY FLAGS...; returns 1 for an unknown
# LAUNCHER (the caller says so in its own words).
launch() {
    local launcher=$1
    shift
    case "$launcher" in
        slurm) exec bash "$ROOT/examples/run_slurm.sbatch" "$@" ;;
        torchrun) exec bash "$ROOT/examples/run_torchrun.sh" "$@" ;;
        *) return 1 ;;
    esac
}

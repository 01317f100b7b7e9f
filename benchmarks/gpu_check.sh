#!/usr/bin/env bash
# One prepared pass of everything that needs a CUDA GPU, for a machine lent for a few minutes:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default $OUT, else ./gpu_check_out
#
# 1. the CUDA-only tests (RNG kept tokens CPU == CUDA, TokenBypass on CUDA, ZeRO-1 resume with
#    fused AdamW on one NCCL rank) and the model/attention tests on whatever device they pick;
#    then a frozen peer under NCCL (2 ranks, --distributed-timeout-minutes 0.5): one line, no hang,
#    and TP2 / PP2 / DP2 over NCCL against one process (with one GPU, 2 ranks share it);
# 2. a 20-iteration bf16 pretrain_gpt.py run on the GPU (mock data, random-LTD on), which also
#    saves, resumes and checks the resumed loss;
# 3. the HF train-step comparison (GPT-2 small, batch 8, bf16 and fp32) and the random-LTD
#    step-time benchmark in bf16.
# Each part writes its log to OUT_DIR and the script goes on after a failure; the summary at
# the end lists what failed. About 8-10 minutes on one H100-class GPU (most of it the two
# benchmarks). Needs torch with CUDA and `pip install -e ".[test,hf]"`. PARTS="name ..." runs
# only those parts, e.g. PARTS="nccl_frozen_peer nccl_layouts" (about 2 minutes).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to do" >&2
    exit 2
fi
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" \
    | tee "$OUT_DIR/device.txt"

failed=()
part() {  # part NAME COMMAND...: run, log to OUT_DIR/NAME.log, remember a failure
    local name=$1
    shift
    if [[ -n "${PARTS:-}" && " $PARTS " != *" $name "* ]]; then
        return
    fi
    echo "== $name: $*"
    local start=$SECONDS
    if "$@" > "$OUT_DIR/$name.log" 2>&1; then
        echo "   ok ($((SECONDS - start)) s)"
    else
        echo "   FAILED ($((SECONDS - start)) s): see $OUT_DIR/$name.log"
        tail -n 5 "$OUT_DIR/$name.log" | sed 's/^/   | /'
        failed+=("$name")
    fi
}

part cuda_tests "$PY" -m pytest -q -rs tests/test_ltd_dropping.py tests/test_ltd_tokenbypass.py \
    tests/test_data_parallel.py tests/test_attention.py tests/test_model_numerics.py
# 2 NCCL ranks (one GPU: both on it, as two NCCL hosts), rank 1 frozen: rank 0 must end in one
# line within --distributed-timeout-minutes 0.5 and a little (about a minute in all)
part nccl_frozen_peer "$PY" -m pytest -q -rs tests/test_faults_training.py -k under_nccl
# TP2, PP2 and DP2 over NCCL against one process on the GPU (the CPU suite checks gloo only)
part nccl_layouts "$PY" -m pytest -q -rs tests/test_parallel_training.py -k over_nccl

CKPT="$OUT_DIR/ckpt"
rm -rf "$CKPT"
TRAIN=(pretrain_gpt.py --device cuda --bf16 --num-layers 4 --hidden-size 256
       --num-attention-heads 8 --seq-length 512 --micro-batch-size 4 --global-batch-size 8
       --train-iters 20 --lr 1e-3 --lr-warmup-iters 2 --mock-data --tokenizer-type
       NullTokenizer --vocab-size 1024 --log-interval 5 --eval-interval 10 --eval-iters 2
       --random-ltd --random-ltd-start 128 --random-ltd-step 64 --random-ltd-schedule-steps 10
       --save "$CKPT" --save-interval 10)
part train_first_half "$PY" "${TRAIN[@]}" --exit-interval 10
part train_resumed "$PY" "${TRAIN[@]}" --load "$CKPT"
part train_full "$PY" "${TRAIN[@]/$CKPT/$OUT_DIR/ckpt_full}"

part bench_train_step "$PY" benchmarks/bench_train_step.py --device cuda --dtype bf16 fp32
part bench_random_ltd "$PY" benchmarks/bench_random_ltd.py --device cuda --dtype bf16 \
    --no-memory --repeats 10

# The resumed run's last logged loss against the uninterrupted run's (same seed and data; CUDA
# kernels are not all deterministic, so equal to 1e-3 relative rather than bitwise).
if [[ -f "$OUT_DIR/train_resumed.log" && -f "$OUT_DIR/train_full.log" ]]; then
    "$PY" - "$OUT_DIR/train_resumed.log" "$OUT_DIR/train_full.log" <<'EOF' || failed+=("resume_matches")
import re, sys
last = [float(re.findall(r"lm loss: ([0-9.E+-]+)", open(p).read())[-1]) for p in sys.argv[1:]]
print(f"resume check: resumed {last[0]:.6E} vs uninterrupted {last[1]:.6E}")
sys.exit(0 if abs(last[0] - last[1]) <= 1e-3 * abs(last[1]) else 1)
EOF
fi

echo
if ((${#failed[@]})); then
    echo "gpu_check: FAILED: ${failed[*]} (logs in $OUT_DIR)"
    exit 1
fi
echo "gpu_check: all parts passed (logs in $OUT_DIR)"

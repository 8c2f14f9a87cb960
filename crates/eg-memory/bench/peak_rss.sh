#!/usr/bin/env bash
# Predicted (eg plan) vs measured (peak RSS of eg train) memory over a grid of configurations.
#
#   cargo build -p eg-cli && crates/eg-memory/bench/peak_rss.sh [EG_BINARY] > table.md
#
# Each configuration (full fine-tuning, LoRA, QLoRA, activation checkpointing, disk offload)
# trains 3 steps of a builtin Llama on the embedded corpus in f32 with a checkpoint after every
# step (so a background checkpoint write overlaps the next step), and
# /usr/bin/time reports the peak RSS. `eg plan --json` gives the prediction for the same
# --set arguments. Prints a Markdown table. Needs GNU time (/usr/bin/time) and python3.
set -euo pipefail
EG=${1:-target/debug/eg}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/eg-memory-peak.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

measure() { # SETUP OPT MODEL SEQ GLOBAL MICRO [extra --set ...]
    local setup=$1 opt=$2 model=$3 seq=$4 global=$5 micro=$6
    shift 6
    local run
    run=$(mktemp -d "$WORK/run.XXXX")
    local sets=(--set "model.source=builtin:$model" --set "data.seq_len=$seq"
        --set "train.batch.global_tokens=$global" --set "train.batch.micro_batch=$micro"
        --set train.precision.compute=f32 --set train.max_steps=3
        --set train.checkpoints.every=1 --set "run.dir=$run"
        --set "train.checkpoints.dir=$run/ckpt" --set train.eval.max_batches=1
        --set memory.activation_checkpointing=off "${@//@RUN@/$run}")
    /usr/bin/time -f "MAXRSS %M" "$EG" train --no-progress "${sets[@]}" >/dev/null 2>"$run/err" || {
        echo "eg train failed for $model $seq $global $micro:" >&2
        cat "$run/err" >&2
        return 1
    }
    local rss pred
    rss=$(awk '/MAXRSS/ {print $2}' "$run/err")
    pred=$("$EG" plan "${sets[@]}" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["chosen"]["estimate"]["peak"])')
    python3 -c "
m = $rss * 1024; p = $pred
print(f'| $model | $setup | $seq | $global | $micro | $opt | {p / 2**20:.1f} | {m / 2**20:.1f} | {100 * (p - m) / m:+.1f}% |')"
    rm -rf "$run"
}

echo "| model | setup | seq_len | global tokens | micro-batch | optimizer | predicted MiB | measured MiB | error |"
echo "|---|---|---|---|---|---|---|---|---|"
measure full adamw micro-llama 64 512 8
measure full adamw tiny-llama 128 2048 16
measure full adamw tiny-llama 256 2048 8
measure full adamw tiny-llama 512 4096 8
measure full adamw small-llama 128 2048 8
measure full adamw small-llama 256 2048 1
measure full adamw small-llama 256 2048 2
measure full adamw small-llama 256 2048 4
measure full adamw small-llama 256 2048 8
measure full sgd small-llama 256 2048 8 --set train.optimizer.kind=sgd --set train.optimizer.momentum=0.9
measure full lion small-llama 256 2048 8 --set train.optimizer.kind=lion
measure full adamw small-llama 512 2048 4
measure full adamw small-llama 1024 2048 2
# LoRA rank 16 on q_proj/v_proj, QLoRA (NF4 base with double quantization).
measure "LoRA r16" adamw small-llama 256 2048 8 --set model.lora.rank=16
measure "LoRA r16" adamw small-llama 512 2048 4 --set model.lora.rank=16
measure "QLoRA nf4 r16" adamw small-llama 256 2048 8 --set model.lora.rank=16 --set model.quantization=nf4
measure "QLoRA int8 r16" adamw small-llama 256 2048 8 --set model.lora.rank=16 --set model.quantization=int8
# Activation checkpointing of every decoder layer.
measure "checkpointing" adamw small-llama 256 2048 8 --set memory.activation_checkpointing=on
measure "checkpointing" adamw small-llama 512 2048 4 --set memory.activation_checkpointing=on
# Optimizer state in memory-mapped files (the run's scratch directory).
measure "disk offload" adamw small-llama 256 2048 8 --set memory.offload=disk --set memory.offload_dir=@RUN@/offload
measure "ckpt + offload" adamw small-llama 512 2048 4 --set memory.activation_checkpointing=on --set memory.offload=disk --set memory.offload_dir=@RUN@/offload

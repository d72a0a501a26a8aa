#!/usr/bin/env bash
# One device call (~4 min on one H200): train RWKV-4 169M on real text with configs/rwkv4-169m-1gpu.yaml
# (ZeRO-0 master path, bf16, fused loss 8192) compiled and eager, same shards and seed, and print both
# loss curves side by side. A compiled backward that loses gradients (as torch 2.11 did with the fused
# loss, docs/benchmarks.md "Correction") shows here as a loss that does not fall.
# Shards: the Python standard library made on the CPU machine (the GPU machine's Python differs):
#   python -c "from pathlib import Path; from pipeline.data_stages import train_tokenizer, tokenize_in_process;
#   from tokenization.config import DataConfig, TokenizerConfig; d = DataConfig(paths=['stdlib:'], unit_bytes=1 << 20);
#   tokenize_in_process(d, train_tokenizer(d, TokenizerConfig(vocab_size=16384, sample_bytes=16 << 20),
#   Path('runs/realtext/tokenizer')), Path('runs/realtext/shards'))"
# then, from the repository root on the GPU machine (device tool: carry [".whl", "runs/realtext"]):
#   bash bench/realtext_device.sh [STEPS [MICRO_BSZ]]   # micro-batch 16 by default; 128 takes the
#   WKV kernel's sequential path (cuda/wkv.cu) instead of the parallel one
set -o pipefail
. bench/device_env.sh --deepspeed || exit 1
OUT=${OUT:-/tmp/realtext_out}
STEPS=${1:-300}
MICRO=${2:-16}
mkdir -p "$OUT"
start=$SECONDS
for compile in true false; do
  limit=$([ $compile = true ] && echo 260 || echo 180)  # the first run also builds both CUDA extensions
  timeout $limit python3 -m orchestration.train configs/rwkv4-169m-1gpu.yaml train.compile=$compile \
      train.micro_bsz="$MICRO" train.steps="$STEPS" train.lr_init=6e-4 train.lr_final=1e-4 train.warmup_steps=20 \
      train.log_every=20 train.val_every=100 train.checkpoint_every=100000 \
      --data runs/realtext/shards --out "/tmp/realtext-$compile" >"$OUT/compile-$compile.log" 2>&1
  echo "compile=$compile: exit $? at $((SECONDS - start)) s"
done
# Side by side: step, then each run's logged loss (and validation loss where logged).
losses='^step [0-9]+/[0-9]+ (loss|val_loss)=[0-9.e+-]+'
paste <(grep -oE "$losses" "$OUT/compile-true.log") \
      <(grep -oE "$losses" "$OUT/compile-false.log" | sed 's/^step [^ ]* //') \
    | sed 's/^/compiled | eager: /'
for compile in true false; do echo "compile=$compile, last: $(grep -E '^step [^ ]+ loss=' "$OUT/compile-$compile.log" | tail -n 1)"; done

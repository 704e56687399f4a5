#!/usr/bin/env bash
# Session 4, call 2 on nvidia-h200-x4: the extravagant GPU test, the 4-GPU scaling bench (qwen3),
# and an A/B of deepseek elastic 2->4 with lazy vs eager CUDA module loading.
set -u
R=/tmp/s4; mkdir -p $R
here=target/hil
mkdir -p $R/ext; ( cd $R/ext && timeout 150 $OLDPWD/$here/bin/test-gpu_elastic extravagant --test-threads=1 --nocapture ) > $R/ext.log 2>&1; echo "extravagant test rc=$?"
grep -E "panicked|test result|under load|stepped" $R/ext.log | cut -c1-400 | head -12
SCALE_MODELS="qwen3-30b-a3b:6" SCALE_STEPS=1-2,2-3,2-4,4-2,3-2 SCALE_STRATEGIES=elastic,cold-restart,colocated,extravagant \
SCALE_ARGS="--concurrency 64 --prompt-len 32 --max-tokens 48 --before-s 3 --after-s 3 --compare 128" \
OUT= timeout 330 bash $here/scale.sh > $R/scale-qwen3.log 2>&1; echo "scale qwen3 rc=$?"
grep -vE "^\[ " $R/scale-qwen3.log | tail -22
mkdir -p $R/scale; cp -r $here/results/scale/qwen3-30b-a3b* $here/results/scale/gpus.csv $R/scale/ 2>/dev/null
for mode in lazy eager; do
  if [ $mode = eager ]; then export CUDA_MODULE_LOADING=EAGER; else export CUDA_MODULE_LOADING=LAZY; fi
  rm -rf $here/results/scale/deepseek-v2-lite
  SCALE_MODELS="deepseek-v2-lite:6" SCALE_STEPS=2-4,1-2 SCALE_STRATEGIES=elastic KEEP_MODELS=1 \
  SCALE_ARGS="--concurrency 64 --prompt-len 32 --max-tokens 48 --before-s 3 --after-s 3 --compare 16 --reference-repeat-concurrency 0" \
  OUT= timeout 150 bash $here/scale.sh > $R/ab-$mode.log 2>&1; echo "A/B $mode rc=$?"
  grep -E "elastic: latency" $R/ab-$mode.log
  cp -r $here/results/scale/deepseek-v2-lite $R/scale/ab-$mode 2>/dev/null
done
tar czf $OUT/s4call2.tgz -C $R .

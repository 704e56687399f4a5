#!/usr/bin/env bash
# Session 4, call 1 on nvidia-h200-x4: GPU tests, the CUDA demo on 4 GPUs, the 4-GPU scaling bench (deepseek).
set -u
R=/tmp/s4; mkdir -p $R
here=target/hil
for f in test-gpu_elastic test-gpu_batch_invariance test-gpu_runtime; do
  mkdir -p $R/$f; HIL_RESULTS=$R/$f timeout 200 bash $here/run.sh $f > $R/$f.log 2>&1; echo "$f rc=$?"
  grep -E "FAIL|panicked|test result|skipp" $R/$f.log | head -8
done
mkdir -p $R/demo
( cd $R/demo && timeout 150 $OLDPWD/$here/bin/elasticmoe demo --devices cuda:0,1,2,3 --quiet --out $R/demo/out --cache $R/demo/cache ) > $R/demo.log 2>&1; echo "demo rc=$?"; tail -3 $R/demo.log
SCALE_MODELS="deepseek-v2-lite:6" SCALE_STEPS=1-2,2-3,2-4,4-2,3-2 SCALE_STRATEGIES=elastic,cold-restart,colocated,extravagant \
SCALE_ARGS="--concurrency 64 --prompt-len 32 --max-tokens 48 --before-s 3 --after-s 3 --compare 128" \
OUT= timeout 330 bash $here/scale.sh > $R/scale.log 2>&1; echo "scale rc=$?"
grep -vE "^\[ " $R/scale.log | tail -25
cp -r $here/results/scale $R/scale 2>/dev/null
tar czf $OUT/s4call1.tgz -C $R .

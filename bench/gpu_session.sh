#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) on this workplace's lent GPU machine: no network there, 64 MiB carried per call,
# released after 30 s idle, so two calls of the `run` tool made back to back (as in session 17, bench/RESULTS.md).
#
#   here:    .venv/bin/python bench/gpu_prepare.py --compact --part-mib 60 && bash bench/gpu_session.sh split
#   call 1:  run(command="bash bench/gpu_session.sh 1", carry=[".gpu1", ".whl"])   # ~55 s: the CUDA tests
#   call 2:  run(command="bash bench/gpu_session.sh 2", carry=[".gpu2"])           # ~300 s: the benchmark
#
# `split` moves .gpu/ into .gpu1/ (the model's first piece) and .gpu2/ (the rest) and downloads the wheels gpu.py
# needs there into .whl/ (gguf; sparsify's, bench/gpu_sparsify.py). ARCHS overrides call 2's live runs,
# DEADLINE its last phase start (s). Later calls on the same warm machine can pass --model
# /tmp/saescope-gpu-bench/model to bench/gpu.py (the unpacked model) instead of --compact.
set -euo pipefail
case "${1:-}" in
split)
  mkdir -p .gpu1 .gpu2 .whl/spx
  mv .gpu/compact.part00 .gpu1/ && mv .gpu/* .gpu2/ && rmdir .gpu
  .venv/bin/pip download -q --no-deps -d .whl gguf
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl/spx eai-sparsify==1.3.3 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 natsort==8.4.0 schedulefree==1.4.1 simple-parsing==0.1.9 \
    docstring-parser==0.18.0
  du -sh .gpu1 .gpu2 .whl ;;
1)
  mkdir -p /tmp/prep /tmp/whl && cp .gpu1/* /tmp/prep/ && cp -r .whl/* /tmp/whl/
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  pip install -q --no-index --no-deps --target /tmp/site /tmp/whl/gguf-*.whl 2>&1 | grep -v WARNING || true
  PYTHONPATH=/tmp/site:$PWD/src timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_device.py \
    -k "cuda or graph or bf16" 2>&1 | tail -15 ;;
2)
  cp .gpu2/* /tmp/prep/
  A=${ARCHS:-jump_relu+bf16+hb=128,jump_relu+bf16+hb=128+lr=0.004,topk+bf16+hb=128+optimizer=adam+lr=0.004}
  O=forward,harvest,sparsify
  for a in ${A//,/ }; do O=$O,train_$a; done
  P=/tmp/prep
  PYTHONPATH=/tmp/site:$PWD/src timeout 480 python3 bench/gpu.py --compact --prepared $P --out "$OUT" \
    --train-tokens 2000000 --cache-tokens 0 --sparsify-python python3 --sparsify-wheels /tmp/whl/spx \
    --deadline-s "${DEADLINE:-400}" --archs "$A" --only "$O" \
    --heldout-extra $P/tokens-heldout-trainseen.npz,$P/tokens-heldout-trainunseen.npz,$P/tokens-heldout-spread.npz \
    2>&1 | grep '^\[' | tail -40 ;;
*)
  echo "usage: bash bench/gpu_session.sh split|1|2 (see the comment at the top)" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# What a session with a lent GPU runs first, in stages (GPU time is short: each
# device stage fits one 10-minute command and writes what it measured to $OUT).
#
#   bash bench/gpu_session.sh wheels   # here, before asking for the GPU: the comparators'
#                                      # wheels (Liger-Kernel, cut-cross-entropy) into .whl/
#   bash bench/gpu_session.sh tests    # on the GPU (device tool, carry [".whl"]): versions,
#                                      # then every test marked gpu (triton-cuda, reference-cuda)
#   bash bench/gpu_session.sh bench    # on the GPU: bench/run.py at the issues' shapes
#   bash bench/gpu_session.sh stages   # on the GPU: bench/stages.py, the time of each Triton kernel
#
# The device image has torch, triton, transformers, pytest and hypothesis; the wheels add
# what it lacks. Results land in $OUT (the device tool brings them back) or in
# bench/results/ when OUT is unset; commit them with the device and versions they name.
set -uo pipefail
stage="${1:?usage: bash bench/gpu_session.sh wheels|tests|bench|stages}"
out="${OUT:-bench/results}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

install_wheels() {
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$py" -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__); print("device", torch.cuda.get_device_name())'
  "$py" -m pip list 2>/dev/null | grep -i -E "^(transformers|liger|cut.cross|hypothesis|pytest) " || true
}

case "$stage" in
  wheels)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel cut-cross-entropy
    ls -l .whl
    ;;
  tests)
    mkdir -p "$out"
    install_wheels
    versions | tee "$out/versions.txt"
    timeout 540 "$py" -m pytest -m gpu -q -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
    ;;
  bench)
    mkdir -p "$out"
    install_wheels
    # the mixed loss and CE at N = 8192 (issue: triton vs seed-style, Liger, the floor) ...
    timeout 330 "$py" bench/run.py --device cuda --tokens 8192 --out-dir "$out" --no-progress 2>&1 | tee "$out/bench.log"
    # ... and the fused-linear rows at N = 16384, H = 768 (issue: against Liger's fused linear CE and CCE)
    timeout 230 "$py" bench/run.py --device cuda --tokens 16384 --hidden 768 --mode fwd+bwd --no-save \
      --impl linear-triton,matmul+triton,ce-linear-triton,ce-liger-flce,ce-cce,ce-matmul-torch \
      --json "$out/cuda-linear.json" --markdown "$out/cuda-linear.md" --no-progress 2>&1 | tail -30
    ;;
  stages)
    mkdir -p "$out"
    versions | tee "$out/versions.txt"
    for path in grad-in-forward backward; do
      timeout 120 "$py" bench/stages.py --path "$path" --json "$out/stages-$path.json" 2>&1 | tee "$out/stages-$path.txt"
      timeout 60 "$py" bench/stages.py --path "$path" --alpha 0 --json "$out/stages-ce-$path.json" 2>&1 \
        | tee "$out/stages-ce-$path.txt"
    done
    ;;
  *)
    echo "unknown stage: $stage (wheels, tests, bench or stages)" >&2
    exit 2
    ;;
esac

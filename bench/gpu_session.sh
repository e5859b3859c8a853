#!/usr/bin/env bash
# The GPU proof in one device command (docs/gpu.md).
#
#   bash bench/gpu_session.sh wheels          # HERE, before asking for the GPU: the comparators' wheels
#                                             # (Liger-Kernel, cut-cross-entropy) and the commit into .whl/
#   bash bench/gpu_session.sh all             # ON THE GPU (device tool: carry [".whl"], timeout_s 480):
#                                             # every step in at most 7 minutes, results in $OUT
#   bash bench/gpu_session.sh all --steps bench,stages   # some steps again (each its own cap)
#   bash bench/gpu_session.sh all --dry       # on CPU: the same steps at tiny shapes under the Triton
#                                             # interpreter (tests/test_gpu_session.py runs it in CI)
#
# `all` runs bench/gpu_session.py: the steps (setup, device, checks, tests, bench, stages, linear,
# more-tests) in priority order, each by its cumulative deadline, the caps adding up to 420 s by
# construction. Results: $OUT (the device tool brings them back), else bench/results/gpu-session
# (--dry: $TMPDIR/fused_cosloss_gpu_session_dry); at most 8 files, summary.md first.
# The GPU image has torch, triton, transformers and pytest and installs nothing: the wheels add the
# comparators, PYTHONPATH the package (no pip install -e), and the native C++ build is skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
stage="${1:-}"
[ $# -gt 0 ] && shift
py="${PYTHON:-python3}"

# Pinned, so that every session measures the same comparators (both are pure-Python wheels).
LIGER_KERNEL_VERSION=0.8.5
CUT_CROSS_ENTROPY_VERSION=25.1.1

case "$stage" in
  wheels)
    git_dir="$(git rev-parse --git-common-dir 2>/dev/null || echo .git)"
    if [ -d "$git_dir/info" ] && ! grep -qx '/.whl/' "$git_dir/info/exclude" 2>/dev/null; then
      echo '/.whl/' >> "$git_dir/info/exclude"
    fi
    mkdir -p .whl
    rm -f .whl/*.whl    # one version of each: two would stop the install there
    # Python 3.12: the GPU image's python3 (/work/.library/device/KINDS.md)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
      "liger-kernel==$LIGER_KERNEL_VERSION" "cut-cross-entropy==$CUT_CROSS_ENTROPY_VERSION" || exit 1
    {
      echo "commit=$(git rev-parse HEAD 2>/dev/null)"
      echo "modified_files=$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
      echo "date=$(date -u '+%Y-%m-%d %H:%M UTC')"
    } > .whl/commit.txt
    ls -l .whl
    du -sh .whl
    ;;
  all)
    exec "$py" bench/gpu_session.py "$@"
    ;;
  *)
    echo "usage: bash bench/gpu_session.sh wheels | all [--dry] [--steps a,b] [--out DIR]" >&2
    exit 2
    ;;
esac

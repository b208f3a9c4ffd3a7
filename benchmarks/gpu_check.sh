#!/usr/bin/env bash
# The GPU checks in one run, for a machine with a CUDA device (the build machines have none).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # default: $OUT, else runs/gpu_check
#
# 1. tests/test_cuda.py and tests/test_device.py: fit with Z/U on the GPU for seven solvers (and
#    the rho="auto" settle with ScaledGD factor hooks for low rank and TT),
#    export, ptflops counts, CUDA latency, float16 autocast + GradScaler, the CLI with
#    --device cuda, and --nproc 2 over NCCL where two GPUs exist;
# 2. exported-model GPU latency vs MACs (latency_speedup.py --quick --device cuda) and channel
#    removal on the GPU (channel_removal.py --device cuda);
# 3. all-layer projection time on the GPU (projection_speed.py --device cuda);
# 4. exported TT / L + S latency vs dense on the GPU (tt_latency_gpu.py, eager; ~4 min).
# About 9 minutes on one H200.  Needs torch with CUDA plus this project's pure-Python
# dependencies (ptflops, tensorly, hypothesis, scikit-learn, matplotlib, tqdm); the package itself
# is taken from the working tree (PYTHONPATH=.).  Wheels found in .whl/ (git-ignored; fetch them
# here with `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform any
# -d .whl ptflops==0.7.5 tensorly==0.10.0`, and name .whl in the device run's `carry`) are
# installed into /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
status=0
{ nvidia-smi -L; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
  2>&1 | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_device.py 2>&1 | tee "$out/pytest_cuda.txt" || status=1
python3 benchmarks/latency_speedup.py --quick --device cuda --out "$out/latency_speedup_cuda.md" \
  > "$out/latency_speedup_cuda.log" 2>&1 || status=1
python3 benchmarks/channel_removal.py --device cuda --rounds 3 --out "$out/channel_removal_cuda.md" \
  > "$out/channel_removal_cuda.log" 2>&1 || status=1
python3 benchmarks/projection_speed.py --device cuda --out "$out/projection_speed_cuda.md" \
  > "$out/projection_speed_cuda.log" 2>&1 || status=1
python3 benchmarks/tt_latency_gpu.py --out "$out/tt_latency_gpu.md" > "$out/tt_latency_gpu.log" 2>&1 || status=1
exit $status

#!/usr/bin/env bash
# One-shot GPU runbook for the triton backend (docs/design.md 4, 9): under 8 minutes on one H100/H200.
#
#     bash benchmarks/gpu_check.sh          # from any directory; PYTHON=python3.12 to pick the interpreter
#
# 1. kernel_report --fast with the machine's own triton (the kernels must compile on triton 3.6 to 3.9)
#    -> benchmarks/results/kernels_gpu_machine.json
# 2. benchmarks.gpu_check: the backend tests on CUDA at scale (PCB both variants, every inter, n up to
#    64, fp32/bf16, D up to 2^24, state dicts; every baseline against the torch backend; TIES'
#    election bit for bit; run to run) -> benchmarks/results/gpu_check.json, the GPU named
# 3. benchmarks.bench_gpu: n=8 at D=2^24 and at the ViT-B/32 size, fp32 and bf16, seconds and GB/s
#    per pass, against one read of the inputs and the reference on the same GPU
#    -> benchmarks/results/gpu.json, the GPU named
# 4. only with more than one GPU: benchmarks.gpu_check_distributed: the triton backend under torchrun,
#    NCCL, one GPU per rank (up to 4), byte for byte against one process, PCB/TIES/DARE-TIES
#    -> benchmarks/results/gpu_check_distributed.json (budget this step on top of the 8 minutes)
# The runbook stops at once (exit 1) if pcb_fast.kernels does not import or triton is older than 3.6.
# Every step runs under its own time limit and writes its JSON after each check or case (a step
# stopped by its limit leaves what it measured); a failed step does not stop the later ones; the exit
# status is 1 if any step failed. Commit the three JSON files, then put gpu.json's table in the README.
#
# The GPU machines have torch and triton preinstalled and no network: the project is installed with
# no dependencies and no build isolation (which would try to download setuptools).
set -u
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET PCB_FAST_BACKEND
PY=${PYTHON:-python3}
start=$SECONDS
status=0

step() {
    local limit=$1
    shift
    echo "== $* (limit ${limit} s)"
    timeout "$limit" "$@"
    local rc=$?
    echo "== exit $rc at $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || status=1
$PY -m pip install --no-deps --no-build-isolation -q -e . || status=1
# Every later step needs the kernels importable as pcb_fast.kernels (an install that ignored the
# link runs nothing) and a Triton the kernels support (--no-deps keeps whatever is preinstalled):
# stop here, at once, rather than spend the machine's time on steps that can only fail.
if ! $PY -c "
import sys
import torch, triton
import pcb_fast.kernels.select
version = tuple(int(p) for p in triton.__version__.split('+')[0].split('.')[:2])
print('torch', torch.__version__, '| triton', triton.__version__, '| CUDA', torch.version.cuda, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')
if version < (3, 6):
    sys.exit(f'triton {triton.__version__} is older than 3.6, the oldest the kernels support')
"; then
    echo "== stopped: pcb_fast.kernels does not import, or triton is older than 3.6 (see above)"
    exit 1
fi

step 60 $PY -m benchmarks.kernel_report --fast --check --jobs 8 --out benchmarks/results/kernels_gpu_machine.json
step 180 $PY -m benchmarks.gpu_check --out benchmarks/results/gpu_check.json
step 200 $PY -m benchmarks.bench_gpu --repeats 3 --out benchmarks/results/gpu.json

gpus=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "${gpus:-0}" -gt 1 ]; then
    step 300 $PY -m benchmarks.gpu_check_distributed --ranks 4 --out benchmarks/results/gpu_check_distributed.json
else
    echo "== one GPU: the multi-GPU check (benchmarks.gpu_check_distributed) does not run"
fi

echo "== done in $((SECONDS - start)) s; status $status"
exit "$status"

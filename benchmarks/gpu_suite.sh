#!/usr/bin/env bash
# The GPU suite: one command for a lent GPU machine, within about 8 minutes on one H100.
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default: benchmarks/results/<date>-<gpu>)
# Where the checkout's .git did not travel with its files (a lent machine), name the commit you sent:
#   FASTVIT_SSL_COMMIT=<sha> bash benchmarks/gpu_suite.sh
# Runs the kernel tests compiled on CUDA, then the kernel benchmarks at realistic sizes, then the end-to-end
# throughput benchmark when it exists. Only torch + triton (+ pytest, pyyaml, pillow) are needed; parts that need
# DALI or DeepSpeed are skipped with a message. The checkout need not be installed: PYTHONPATH=. is enough.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '-'))" 2>/dev/null || echo no-gpu)
out=${1:-benchmarks/results/$(date +%F)-$gpu}
mkdir -p "$out"
status=0

python3 - > "$out/environment.txt" <<'PY'
import platform, subprocess, torch, triton
from fastvit_ssl import runinfo
print("device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("commit:", runinfo.git_commit())
print("python:", platform.python_version(), "torch:", torch.__version__, "triton:", triton.__version__)
for name in ("deepspeed", "nvidia.dali"):
    try:
        __import__(name)
        print(name, "installed")
    except ImportError:
        print(name, "missing: its parts of the suite are skipped")
PY
cat "$out/environment.txt"

echo "== kernel tests, compiled on CUDA =="
timeout 240 python3 -m pytest tests/kernels tests/test_timm_compat.py -q -p no:cacheprovider -k "not installed_copy" \
  --ignore tests/kernels/test_aot_compile.py \
  2>&1 | tee "$out/kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel benchmarks =="
timeout 200 python3 benchmarks/kernels.py --out "$out/kernels.csv" 2>&1 | tee "$out/kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -f benchmarks/throughput.py ]; then
  echo "== end-to-end throughput =="
  timeout 240 python3 benchmarks/throughput.py --suite --method all --out "$out/throughput.csv" 2>&1 | tee "$out/throughput.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
echo "results in $out (status $status)"
exit $status

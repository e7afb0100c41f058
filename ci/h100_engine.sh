#!/usr/bin/env bash
# Nightly GPU check on any H100 box: the TensorRT-LLM engine for a card, the GPU tests, the perf gates.
#
#   DMS_MODEL_DIR=/models/Qwen3-8B DMS_RETROFIT_DATA=/data/traces.jsonl ci/h100_engine.sh [MODEL] [ARTIFACTS_DIR]
#
# Runs itself inside NVIDIA's TensorRT-LLM 1.2.1 container (tritonserver 25.12) with the repository and
# the model directory mounted, unless it is already inside one (tensorrt_llm importable). Inside, the
# pipeline's own environment is the Makefile's venv; trtllm-build uses the container's Python
# (DMS_TRTLLM_PYTHON). Writes the report, build log, engine manifest and GPU-check JSON to ARTIFACTS_DIR
# (default ci-artifacts/). Exit status: the first failing step's.
set -euo pipefail

MODEL="${1:-qwen3-8b}"
ARTIFACTS="${2:-ci-artifacts}"
IMAGE="${DMS_TRTLLM_IMAGE:-nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"

if ! python3 -c "import tensorrt_llm" >/dev/null 2>&1; then
    command -v nvidia-smi >/dev/null || { echo "error: no nvidia-smi: this script needs an NVIDIA GPU" >&2; exit 2; }
    command -v docker >/dev/null || { echo "error: docker is needed to run the TensorRT-LLM container $IMAGE" >&2; exit 2; }
    : "${DMS_MODEL_DIR:?set DMS_MODEL_DIR to the Hugging Face directory of the base model}"
    data=()  # the distillation traces, for cards with retrofit.data: null (the GPU cards)
    if [ -n "${DMS_RETROFIT_DATA:-}" ]; then
        data_dir="$(cd "$(dirname "$DMS_RETROFIT_DATA")" && pwd)"
        data=(-v "$data_dir:/data:ro" -e "DMS_RETROFIT_DATA=/data/$(basename "$DMS_RETROFIT_DATA")")
    fi
    docker pull "$IMAGE"
    exec docker run --rm --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
        -v "$REPO:/workspace/dms" -v "$DMS_MODEL_DIR:/models/base:ro" ${data[@]+"${data[@]}"} \
        -w /workspace/dms -e DMS_MODEL_DIR=/models/base -e DMS_TRTLLM_IMAGE="$IMAGE" -e HF_HUB_OFFLINE=1 \
        "$IMAGE" bash ci/h100_engine.sh "$MODEL" "$ARTIFACTS"
fi

mkdir -p "$ARTIFACTS"
nvidia-smi | tee "$ARTIFACTS/nvidia-smi.txt"
export DMS_TRTLLM_PYTHON="$(command -v python3)"
python3 -c "import tensorrt_llm, tensorrt; print('tensorrt_llm', tensorrt_llm.__version__, 'tensorrt', tensorrt.__version__)" \
    | tee "$ARTIFACTS/versions.txt"

status=0
step() {  # run a step, keep going, remember the first failure
    local name="$1"; shift
    echo "=== $name: $*"
    if ! "$@" 2>&1 | tee "$ARTIFACTS/$name.log"; then
        echo "=== $name FAILED" | tee -a "$ARTIFACTS/summary.txt"
        [ "$status" -ne 0 ] || status=1
    else
        echo "=== $name ok" | tee -a "$ARTIFACTS/summary.txt"
    fi
}

step setup make setup PY=python3
step gpu-kernel .venv/bin/python ci/gpu_check.py --require-gpu --out "$ARTIFACTS/gpu_check.json"
step gpu-tests .venv/bin/python -m pytest -q -ra -m gpu
step engine make engine MODEL="$MODEL" PY=python3 ARGS="--backend trtllm"
step perf make perf MODEL="$MODEL" PY=python3

root="build/$MODEL"
for f in "$root/report.json" "$root/build/build.log" "$root/build/engine/dms_build.json"; do
    [ -f "$f" ] && cp "$f" "$ARTIFACTS/" || true
done
[ -d "$root/perf" ] && cp -r "$root/perf/." "$ARTIFACTS/perf/" 2>/dev/null || true
[ -d "$root/failed" ] && cp -r "$root/failed" "$ARTIFACTS/failed" || true  # logs of a failed stage
exit "$status"

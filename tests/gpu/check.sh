#!/usr/bin/env bash
# The GPU check in one command (≤ 8 minutes on one CUDA GPU), from any directory:
#     bash tests/gpu/check.sh [--out REPORT.json]       (default: $OUT/gpu-check.json or ./gpu-check.json)
#     bash tests/gpu/check.sh --device cpu --tiny       (dry run of every section on CPU)
# Runs from the checkout without installing it; python3 must hold torch, transformers,
# peft, accelerate, typer and rich (datasets, math-verify and vLLM are not needed).
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec timeout "${CHECK_TIMEOUT:-480}" "${PYTHON:-python3}" tests/gpu/check.py "$@"

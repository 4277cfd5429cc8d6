#!/bin/sh
# Build ox-quant's custom-op libraries into ox_quant/lib (see custom_ops/README.md).
#   tools/build_ops.sh [--no-cuda|--cuda] [--cuda-arch "80;90"] [--json]
set -eu
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m ox_quant.cli build-ops "$@"

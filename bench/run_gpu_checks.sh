#!/usr/bin/env bash
# Every GPU check of the project in one command (one H100/H200, a few minutes):
#   bench/run_gpu_checks.sh OUT_DIR            # all parts
#   bench/run_gpu_checks.sh OUT_DIR adapters   # issue 2's checks only (~4 min): adapter GPU
#                                              # tests, the layer bench, the paper-scale step
#                                              # with lora vs hdmole on the projector
# 1. GPU-only tests (pytest -m gpu): bf16 adapters under autocast, CUDA-graph decoding;
# 2. the adapter layer at the paper shape (16,384 tokens, 6400 -> 2048, 8 experts, rank 8);
# 3. the model at paper scale (random init, bf16): 30 s padded vs variable-length training
#    steps, greedy decoding tokens/s against HF generate;
# 4. the paper-scale smoke: HDMoLE training steps through the Trainer, checkpoint, decode.
# Each part has its own time limit so that one slow part cannot take the others down;
# results land as JSON (and logs) in OUT_DIR.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:?usage: $0 OUT_DIR}"
mkdir -p "${out}"
. ./path.sh 2>/dev/null
export PYTHONUNBUFFERED=1
python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name(0))'
status=0
part() {  # part NAME SECONDS CMD...
    local name="$1" limit="$2"; shift 2
    local t0=${SECONDS}
    echo "=== ${name} (limit ${limit} s)"
    timeout "${limit}" "$@" 2>&1 | tee "${out}/${name}.log" | tail -n 40
    local rc=${PIPESTATUS[0]}
    echo "=== ${name}: rc=${rc} in $(( SECONDS - t0 )) s"
    [ "${rc}" -eq 0 ] || status=1
}
if [ "${2:-all}" = adapters ]; then  # ~4 min (H200, 2026-11-26); limits add up to 570 s
    part gpu_tests 120 python -m pytest -q -m gpu -p no:cacheprovider tests/test_adapters.py
    part adapter_layer 240 python bench/adapter_layer.py --shape paper --profile \
        --kernel-table "hdmole layer (default)" --out "${out}/adapter_layer.json"
    # The layer inside the model: does its host cost show in a real training step?
    for adapter in lora hdmole; do
        part "paper_smoke_${adapter}" 105 python bench/paper_scale_smoke.py --adapter "${adapter}" \
            --out "${out}/paper_scale_smoke_${adapter}.json"
    done
    exit "${status}"
fi
part gpu_tests 120 python -m pytest -q -m gpu -p no:cacheprovider tests/test_adapters.py tests/test_model.py
part adapter_layer 150 python bench/adapter_layer.py --shape paper --out "${out}/adapter_layer.json"
part model_throughput 220 python bench/model_throughput.py --scale paper --out "${out}/model_throughput.json"
part paper_smoke 170 python bench/paper_scale_smoke.py --out "${out}/paper_scale_smoke.json"
exit "${status}"

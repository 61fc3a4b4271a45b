#!/usr/bin/env bash
# The GPU check: one script, under 8 minutes on one GPU, for whoever is lent one. It runs the test suite's
# CUDA-marked tests (exact kernels against the CPU reference, projections, compute, attribute and distill on the
# device) and the bench's quick CUDA workloads, and prints one table of both. It uses the machine's own python3
# (PyTorch with CUDA, h5py, typer, rich, safetensors, scikit-learn, transformers, pytest and hypothesis there) and
# installs nothing; the files go to $OUT (the device tool's folder) or /tmp/gpu-check.
#
#     device.run: bash scripts/gpu_check.sh        (timeout_s 540)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
timeout 240 "$python" -m pytest -m cuda tests -p no:cacheprovider -q -rs 2>&1 | tee "$out/tests.log"
tests=${PIPESTATUS[0]}
timeout 240 "$python" scripts/bench.py --quick --device cuda --only 1,3,8,9 --json "$out/bench.json" 2>&1 | tee "$out/bench.log"
bench=${PIPESTATUS[0]}
echo
echo "| check | result |"
echo "|---|---|"
echo "| CUDA tests | $(grep -E '[0-9]+ (passed|failed)' "$out/tests.log" | tail -1) (exit $tests) |"
echo "| bench --quick --device cuda | exit $bench; table in $out/bench.log |"
exit $(( tests || bench ))

#!/usr/bin/env bash
# Creates explaind's venv OUTSIDE the repo (idempotent) for bench workload 10: explaind 0.1.0 (the exact path kernel's
# one public implementation) with torch 2.13.0 (CPU). explaind declares Python >= 3.12, but the modules the bench drives
# (epk_model, model_paths, optimizer_paths, data_paths) run on 3.11, the Python these machines carry a CPU torch
# wheel for; so it is installed with --ignore-requires-python and --no-deps (its own deps: torch, tqdm). h5py and
# scikit-learn let scripts/peers/explaind_epk.py read the trajectory file and the digits. Never a dependency.
#   bash scripts/peers/setup_explaind.sh      # then $ROOT/venv-explaind/bin/python
set -euo pipefail
ROOT=${NTK_PEERS_CACHE:-$HOME/.cache/ntk-peers}
V=$ROOT/venv-explaind
mkdir -p "$ROOT"
[[ -x $V/bin/python ]] || python3.11 -m venv "$V"
# torch MUST stay pinned to 2.13.0 (local CPU wheel); unpinned torch pulls a multi-GB CUDA build.
"$V/bin/pip" install torch==2.13.0 numpy tqdm h5py scikit-learn
"$V/bin/pip" install --no-deps --ignore-requires-python explaind==0.1.0
"$V/bin/python" -c "import explaind.epk_model, torch; print('explaind 0.1.0, torch', torch.__version__)"

#!/usr/bin/env bash
# The prepared GPU check on a machine without network that has only Python, torch and transformers (with their own
# dependencies): installs this package's other pure-Python dependencies from wheels/ (made beforehand with
# `make gpu-wheels` where there is network) into .gpu-deps/, then runs `python -m dash_exp.bench gpu`.
#
#   scripts/gpu_check.sh                        # one GPU, ~6 min
#   scripts/gpu_check.sh --cpu --steps 2        # the test size on the CPU
#   PYTHON=/path/to/python scripts/gpu_check.sh # another interpreter (default: python3)
#
# Arguments go to `python -m dash_exp.bench gpu` (--cpu, --steps N, --out DIR, Hydra overrides).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
DEPS=.gpu-deps
STAMP=$DEPS/.installed

shopt -s nullglob
wheels=(wheels/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "gpu_check: wheels/ is missing or empty: run make gpu-wheels where there is network, then copy wheels/ along" >&2
    exit 1
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L || true
fi
"$PYTHON" -c "import sys, torch, transformers; print(f'python {sys.version.split()[0]}, torch {torch.__version__} \
(CUDA available: {torch.cuda.is_available()}), transformers {transformers.__version__}')"

# install into .gpu-deps/ (the machine's site-packages stay untouched) unless it already holds exactly these wheels
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${wheels[*]}" ]; then
    rm -rf "$DEPS"
    if "$PYTHON" -m pip --version >/dev/null 2>&1; then
        "$PYTHON" -m pip install -q --disable-pip-version-check --no-index --no-deps --target "$DEPS" "${wheels[@]}"
    else  # no pip: a pure-Python wheel is a zip of its importable files
        for whl in "${wheels[@]}"; do "$PYTHON" -m zipfile -e "$whl" "$DEPS"; done
    fi
    echo "${wheels[*]}" >"$STAMP"
    echo "installed ${#wheels[@]} wheels into $DEPS/"
fi

out=runs/bench
prev=
for arg in "$@"; do  # the results directory when --out is passed through
    case "$arg" in --out=*) out=${arg#--out=} ;; esac
    [ "$prev" = --out ] && out=$arg
    prev=$arg
done

# no network here: fail at once instead of waiting on the hub
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
PYTHONPATH="$PWD/$DEPS:$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m dash_exp.bench gpu --out runs/bench "$@"
echo "JSON: $out/gpu.json"

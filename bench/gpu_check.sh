#!/usr/bin/env bash
# One device call on the GPU machine (bench/NOTES.md section 4 gives the exact call), or a dry run:
#
#   bash bench/gpu_check.sh              # $OUT from the device tool; the stages of bench/gpu_check.py
#   bash bench/gpu_check.sh --dry-run    # anywhere: every stage at toy size on the CPU
#
# Installs fastgan if it is not importable (editable, no dependencies: the machine has no index; a
# copy on PYTHONPATH if pip cannot), then hands over to bench/gpu_check.py with the time the call
# began, so its budget counts this too.
set -uo pipefail
started=$(date +%s.%N)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT="${OUT:-/tmp/fastgan-gpu-check-out}"
mkdir -p "$OUT"
python="${PYTHON:-python3}"

if ! "$python" -c "import fastgan.kernels" 2>/dev/null; then
    echo "installing fastgan (pip install --no-deps --no-build-isolation -e .)"
    said=$(timeout 120 "$python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1)
    echo "$said" | tail -3
    if [[ $said == *externally-managed-environment* ]]; then
        # a system Python under PEP 668: fastgan alone, no dependencies, on a machine used once
        echo "again with --break-system-packages"
        timeout 120 "$python" -m pip install -q --no-deps --no-build-isolation --break-system-packages -e . 2>&1 | tail -3
    fi
    if ! "$python" -c "import fastgan.kernels" 2>/dev/null; then
        # setup.py maps kernels/ to fastgan.kernels; without pip, the same layout in a copy (the
        # same sources: bench/triton_cache.py builds from it, Triton keys kernels on source, not path)
        src="${TMPDIR:-/tmp}/fastgan-src"
        rm -rf "$src" && mkdir -p "$src" && cp -r fastgan "$src/" && cp -r kernels "$src/fastgan/kernels"
        export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
        echo "pip failed: running fastgan from a copy in $src"
    fi
fi
exec "$python" bench/gpu_check.py --started "$started" "$@"

#!/usr/bin/env bash
# What a session with a lent GPU runs, in stages that each fit one device call (<= 10 minutes),
# from the repository root on the device machine (torch 2.11 / triton 3.6, no internet, no DALI):
#
#   bash bench/gpu_session.sh setup      # install fastgan (no deps) and print the environment
#   bash bench/gpu_session.sh parity     # kernel parity suite on CUDA (fp32 IEEE, fp16, bf16, tf32,
#                                        # inductor fullgraph) + the CUDA-graph step tests
#   bash bench/gpu_session.sh bench [ARGS]  # bench/throughput.py --append ARGS: one table built up
#                                        # over several calls in /tmp/fastgan-bench.json (kept while
#                                        # the machine stays warm), copied to $OUT after each call
#   bash bench/gpu_session.sh ops        # tests/test_bench_ops.py: each fused op against cuDNN
#   bash bench/gpu_session.sh train      # a short real training run on synthetic faces, triton + graph
#   bash bench/gpu_session.sh pack       # (on the CPU machine) DALI's wheels + deps -> .dali/part-*
#   bash bench/gpu_session.sh keep       # (on the GPU) park the part carried in .dali in /tmp/dali-parts
#   bash bench/gpu_session.sh dali       # (on the GPU) reassemble .dali/part-*, install, bench/loader.py
#
# Everything a stage writes goes to $OUT (the device tool brings it back). DALI and its dependencies
# are larger than one call carries (64 MiB): `pack` splits them into 60 MiB parts under .dali/
# (git-ignored); send them over successive calls, each carrying `.dali` holding only the next part
# (the device keeps ignored paths between calls while it stays warm: move each part to /tmp/dali-parts
# there), then run `dali`.
set -euo pipefail
OUT=${OUT:-/tmp/fastgan-out}
mkdir -p "$OUT"
stage=${1:?usage: bash bench/gpu_session.sh setup|parity|bench|ops|train|pack|keep|dali}
shift

install() {
    python -c "import fastgan.kernels" 2>/dev/null ||
        pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
}

case "$stage" in
setup)
    install
    nvidia-smi | tee "$OUT/nvidia-smi.txt"
    python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
    pip list 2>/dev/null | grep -iE "^(torch|triton|numpy|pillow|safetensors|pytest|nvidia-dali)" || true
    ;;
parity)
    install
    python -m pytest -q -rs tests/test_conv.py tests/test_conv_transpose.py tests/test_wgrad.py \
        tests/test_batchnorm.py tests/test_fused_models.py tests/test_graph.py -p no:cacheprovider \
        --junitxml="$OUT/parity.xml" 2>&1 | tee "$OUT/parity.txt" | tail -40
    ;;
bench)
    install
    table=/tmp/fastgan-bench.json
    python bench/throughput.py --append --out "$table" "$@" 2>&1 | tee "$OUT/throughput.txt" | tail -60 || true
    # bench/results/<device>-<date>.json, the name bench/results/README.md gives
    name=$(python -c 'import json, sys; sys.path.insert(0, "bench"); from timing import slug
d = json.load(open(sys.argv[1])); print(slug(d["device"]) + "-" + d["date"])' "$table")
    cp "$table" "$OUT/$name.json"
    ;;
ops)
    install
    python -m pytest -q -rs tests/test_bench_ops.py -p no:cacheprovider --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-json="$OUT/ops.json" 2>&1 | tee "$OUT/ops.txt" | tail -60
    ;;
train)
    install
    python fastgan/train.py configs/dcgan/dcgan_celeba-cropped_64_b128x1_300k.py --work_dir="$OUT/run" \
        --data.source=synthetic --data.root=/tmp/faces --data.synthetic_count=20000 --total_iters=3000 \
        --amp=bf16 --sample_interval=1000 --ckpt_interval=1000 --log_interval=100 2>&1 | tail -40
    ;;
pack)
    rm -rf .dali && mkdir -p .dali/wheels
    pip download -q nvidia-dali-cuda130==2.4.0 --python-version 3.11 --only-binary=:all: -d .dali/wheels
    tar -C .dali -cf .dali/dali.tar wheels && rm -rf .dali/wheels
    split -b 60M .dali/dali.tar .dali/part- && rm .dali/dali.tar
    ls -la .dali
    ;;
keep)   # on the GPU, after each call that carried one part: park it outside the carried folder
    mkdir -p /tmp/dali-parts && cp .dali/part-* /tmp/dali-parts/ && ls -la /tmp/dali-parts
    ;;
dali)
    cat /tmp/dali-parts/part-* > /tmp/dali.tar && tar -C /tmp -xf /tmp/dali.tar
    pip install -q --no-index --find-links /tmp/wheels nvidia-dali-cuda130
    install
    python bench/loader.py --out "$OUT/loader.json" 2>&1 | tail -30
    ;;
*)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac

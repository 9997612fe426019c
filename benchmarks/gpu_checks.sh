#!/usr/bin/env bash
# The figures issues 13 and 16 still need a GPU for, as one command for a lent H200 (about 9 minutes).
#
# Here, once, with a network: the wheels the device image lacks (zarr and its needs), into .whl:
#     bash benchmarks/gpu_checks.sh --wheels          # .whl is in .gitignore
# On the device (the `run` tool, carry [".whl"], timeout_s 600):
#     bash benchmarks/gpu_checks.sh
#
# Each step runs under its own time limit, so one slow step cannot take the others' time. Each writes
# OUT/<step>.log (OUT: the tool's $OUT, else /tmp/gpu-checks); OUT/summary.txt gets one line per step:
# its exit status and seconds. The steps, most wanted first:
#   gpu-tests         tests/test_gpu.py: CUDA against CPU features, bf16, the torch index (float32, float16 and
#                     bfloat16 rows; more queries than its 4,096 a product), the ensemble's index, Adam's rank-R
#                     refit and D = 1/r on the GPU, the eigen basis and capture, the per-rank GPU of one GPU
#                     (skipped on the CPU machines CI and development run on)
#   capture-adamw     issue 16's target: capture's step overhead at k = 4,096 on a GPT-2-small-shaped
#                     transformer (12 × 768, vocabulary 50,257, 16 × 512 tokens), AdamW, every Fisher variant
#   gpt2-124m         issue 13: GPT-2 124M trained with the recorder, featurized (factored, k = 16,384,
#                     bf16) and fitted on the GPU: tokens/s, examples/s, peak memory per phase
#   query-10m         issue 13: 10,000 top-50 queries over 10M rows (k = 1,024, fp32 and bf16 rows)
#   eigen-basis       issue 13: a 1B Llama's 8,192-wide Kronecker factor decomposed whole and for its leading
#                     64 eigenpairs on the GPU (the eigen basis's decompositions; 48 such factors a basis)
#   (not in the 10 minutes: the default eigen projection on GPT-2 124M, its basis pass included, is
#   `python3 benchmarks/transformer_gpu.py --model gpt2-124m --length 1024 --sequences 512 --steps 40
#    --dim 16384 --precision bf16 --projection eigen --phases featurize,fit --out /tmp/transformer-gpu`, on a
#   second call while the machine is still warm: it reads the run the gpt2-124m step trained; the same with
#   `--fisher sampled` and then `--fisher sampled --fisher-examples 64` times the sampled Fisher's backward and
#   what featurize saves with the Fisher of a share of the sequences; and capture's own passes in bf16 on a run
#   trained in bf16: `python3 benchmarks/capture_overhead.py --model gpt --optimizer adamw --device cuda --dim 4096
#   --width 768 --layers 12 --heads 12 --vocab 50257 --seq 512 --batch 16 --steps 30 --warmup 0 --save-every 20
#   --examples 1024 --precision bf16 --variants defaults,defaults-bf16`; and featurize's writes behind the GPU's
#   computation against in line: `python3 benchmarks/write_behind.py --device cuda --threads 8 --rounds 3
#   --out /tmp/write-behind`, about a minute; and the store's write and read rates on that machine's disk, which
#   bound a GPU featurize at large k: `python3 benchmarks/store_scale.py --rows 262144 --dim 4096 --chunk-rows 1024
#   --shard-chunks 16`, about half a minute; and the language-model loss's blocks on the GPU, time and memory:
#   `python3 benchmarks/loss_blocks.py --device cuda`, then with `--dtype bf16`, then `--memory --dtype bf16`,
#   under a minute each)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--wheels" ]]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
    exit
fi

OUT="${OUT:-/tmp/gpu-checks}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "could not install the carried wheels" | tee "$OUT/summary.txt"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/summary.txt" 2>&1
python3 -c "import torch, source_proj; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" \
    >> "$OUT/summary.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    echo "$name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
    tail -n 12 "$OUT/$name.log"
}

step gpu-tests 90 python3 -m pytest -p no:cacheprovider -q tests/test_gpu.py
step capture-adamw 120 python3 benchmarks/capture_overhead.py --model gpt --optimizer adamw --device cuda \
    --dim 4096 --width 768 --layers 12 --heads 12 --vocab 50257 --seq 512 --batch 16 --steps 30 --warmup 5 \
    --save-every 20 --variants empirical,factored/4,factored,separate,eigen,eigen/2,eigen/4 --json "$OUT/capture-adamw.json"
step gpt2-124m 200 python3 benchmarks/transformer_gpu.py --model gpt2-124m --length 1024 --sequences 512 \
    --steps 40 --dim 16384 --precision bf16 --out /tmp/transformer-gpu
step query-10m 100 python3 benchmarks/query_scale.py --n 10000000 --dim 1024 --queries 10000 --top-k 50 \
    --backends torch,torch-bf16 --device cuda
step eigen-basis 45 python3 benchmarks/eigen_basis_time.py --sides 8192 --block none --threads 16 --device cuda \
    --json "$OUT/eigen-basis.json"

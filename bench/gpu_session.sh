#!/usr/bin/env bash
# One device call: set up the carried wheels, then run the named phases, each under its own time limit, with
# every log under $OUT. Usage: bash bench/gpu_session.sh PHASE[:SECONDS] ...
#   tests     pytest -m gpu (tests/test_gpu.py, tests/test_quantize.py; TEST_FLAGS: other test ids instead)
#   predict   bench/bench_predict.py          serve   bench/bench_serve.py
#   profile   bench/bench_predict.py --profile (where predict.py's model time goes; PROFILE_TEXTS texts)
#   quant     bench/bench_quant.py (QUANT_ONLY selects variants)
#   train     bench/bench_gpu.py default rows (--skip ref --quick)
#   memory    bench/bench_memory.py (capped-memory runs of the original recipe; MEMORY_FLAGS adds flags)
#   compile   bench/bench_compile.py (where compile time goes; COMPILE_VARIANTS selects variants, COMPILE_FLAGS adds flags)
#   startup   bench/bench_startup.py (where a one-off test_saved_lora.py's wall time goes; STARTUP_RUNS runs;
#             STARTUP_SETTINGS: flag sets separated by ';', run in turn)
#   kernels   bench/bench_kernels.py (GPU time of a training step and an evaluation by kernel and GEMM shape)
#   det       bench/bench_deterministic.py (inductor's deterministic mode against its timed reduction configs:
#             throughput, compile time, bitwise-equal runs from cold caches; DET_RUNS runs of each)
#   evalgap   bench/bench_kernels.py --eval_gap (is evaluation GPU-bound: wall against GPU busy time; GAP_TEXTS, GAP_ROWS)
#   int8mlp   bench/bench_quant.py --gpu_mlp (int8 forms against bf16 on one MLP by tokens per forward)
#   cpuint8   bench/bench_quant.py --cpu_crossover (the host CPU: int8 against fp32 and bf16 on one MLP; CPU_THREADS)
#   small     bench/bench_startup.py --small_jobs (test_saved_lora.py on 3,000 texts, auto vs eager; STARTUP_RUNS)
#   firststep bench/bench_startup.py --train (train_lora.py, original recipe: launch to step 1, cold and warm;
#             STARTUP_PROFILE=1: a third run's set-up under cProfile; STARTUP_AB=1: then STARTUP_RUNS rounds of
#             cold and warm with the compile-ahead thread on and off, on this one machine)
#   full      bench/bench_gpu.py --full_recipe (the original full recipe end to end, from launch)
#   imports   bench/bench_imports.py (import times, -X importtime): with the carried wheels, then the image's alone
#   all       bench/bench_all.py (issue 13's rows in one call: one lane per GPU; its deadline is the phase's limit)
set -uo pipefail
# torchao goes in a folder of its own, on the path only for the phases that quantise (tests, quant): it is not in
# requirements.txt, and where it is installed transformers imports it (and its CUDA ops register) at every model
# load, which a user's start-up does not pay
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $(ls .whl/*.whl | grep -v /torchao-) || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-quant \
  .whl/torchao-*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# The image's site-packages keep no bytecode a process can reuse: every import compiles its modules from source
# (run 20's profile: 3,892 compiles in one warm train_lora.py set-up). A user's pip install writes them once.
# PYCACHE=1 keeps them in /tmp/pycache for the session, as an installed environment has them.
python3 -c "import sys, os, sysconfig; p = sysconfig.get_paths()['purelib']; print('bytecode: dont_write', sys.dont_write_bytecode, 'prefix', sys.pycache_prefix, 'site-packages', p, 'writable', os.access(p, os.W_OK), 'transformers pycache', os.path.isdir(os.path.join(p, 'transformers', '__pycache__')))"
if [ -n "${PYCACHE:-}" ]; then unset PYTHONDONTWRITEBYTECODE; export PYTHONPYCACHEPREFIX=/tmp/pycache; fi
# CLEAN=1: run in a virtual environment of requirements.txt's distributions alone (bench/clean_venv.py: links into
# the image's and the carried packages), as a user's `pip install -r requirements.txt` makes: ~100 distributions
# against the image's 216, which torch, networkx and dynamo list at every start. Falls back to the image if an import fails.
if [ -n "${CLEAN:-}" ]; then
  warm="import torch, torch._dynamo, torch._inductor.compile_fx, transformers, peft, pandas, sklearn.metrics, matplotlib.pyplot, openpyxl, fastapi, uvicorn; from transformers import Qwen3Model, AutoTokenizer"
  if python3 bench/clean_venv.py /tmp/cleanvenv && PYTHONPATH=$PWD /tmp/cleanvenv/bin/python3 -c "$warm"; then
    export PATH=/tmp/cleanvenv/bin:$PATH PYTHONPATH=$PWD; echo "environment: /tmp/cleanvenv (requirements.txt only)"
  else echo "environment: the image's (the clean one failed)"; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
mkdir -p "$OUT"
for spec in "$@"; do
  phase=${spec%%:*}; limit=${spec#*:}; [ "$limit" = "$spec" ] && limit=300
  echo "=== $phase (limit ${limit} s) $(date +%T)"
  case $phase in
    tests)   cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider ${TEST_FLAGS:-tests/test_gpu.py tests/test_quantize.py}) ;;
    predict) cmd=(python3 bench/bench_predict.py --out "$OUT/predict") ;;
    profile) cmd=(python3 bench/bench_predict.py --texts "${PROFILE_TEXTS:-24000}" --profile "${PROFILE_TEXTS:-24000}" --out "$OUT/profile") ;;
    serve)   cmd=(python3 bench/bench_serve.py --out "$OUT/serve") ;;
    quant)   cmd=(python3 bench/bench_quant.py --out "$OUT/quant" --only "${QUANT_ONLY:-}") ;;
    train)   cmd=(python3 bench/bench_gpu.py --skip ref --quick --out "$OUT/train") ;;
    memory)  cmd=(python3 bench/bench_memory.py --out "$OUT/memory" ${MEMORY_FLAGS:-}) ;;
    compile) cmd=(python3 bench/bench_compile.py --out "$OUT/compile" --variants "${COMPILE_VARIANTS:-base,attn_eager,no_dropout,fallback_random}" ${COMPILE_FLAGS:-}) ;;
    startup) cmd=(python3 bench/bench_startup.py --runs "${STARTUP_RUNS:-2}" --settings "${STARTUP_SETTINGS:-}" --out "$OUT/startup") ;;
    kernels) cmd=(python3 bench/bench_kernels.py --out "$OUT/kernels") ;;
    det)     cmd=(python3 bench/bench_deterministic.py --runs "${DET_RUNS:-2}" --out "$OUT/det") ;;
    evalgap) cmd=(python3 bench/bench_kernels.py --eval_gap "${GAP_TEXTS:-18000}" --eval_gap_rows "${GAP_ROWS:-9216,18432}" --out "$OUT/evalgap") ;;
    cpuint8) grep -m1 "model name" /proc/cpuinfo; grep -m1 -o -w "amx_int8\|amx_bf16\|avx512_bf16\|avx512_vnni" /proc/cpuinfo | sort -u | tr "\n" " "; echo
             cmd=(python3 bench/bench_quant.py --cpu_crossover "${CPU_THREADS:-16}" --out "$OUT/cpuint8") ;;
    int8mlp) cmd=(python3 bench/bench_quant.py --gpu_mlp --out "$OUT/int8mlp" --only "${QUANT_ONLY:-}" --tokens "${MLP_TOKENS:-64,512,4096,9216}") ;;
    small)   cmd=(python3 bench/bench_startup.py --small_jobs --runs "${STARTUP_RUNS:-2}" --out "$OUT/small") ;;
    firststep) cmd=(python3 bench/bench_startup.py --train ${STARTUP_PROFILE:+--profile} ${STARTUP_AB:+--compile_thread_ab} --runs "${STARTUP_RUNS:-1}" --out "$OUT/firststep") ;;
    full)    cmd=(python3 bench/bench_gpu.py --full_recipe --out "$OUT/full") ;;
    imports) cmd=(bash -c 'python3 bench/bench_imports.py --out "$OUT/imports" && PYTHONPATH=$PWD python3 bench/bench_imports.py --out "$OUT/imports"') ;;
    all)     cmd=(python3 bench/bench_all.py --out "$OUT/all" --deadline $((limit - 15))) ;;
    *) echo "unknown phase $phase"; continue ;;
  esac
  case $phase in tests|quant|int8mlp|cpuint8) path=/tmp/site-quant:$PYTHONPATH ;; *) path=$PYTHONPATH ;; esac
  PYTHONPATH=$path timeout -k 10 "$limit" "${cmd[@]}" > "$OUT/$phase.log" 2>&1
  echo "exit $? after $SECONDS s"; tail -n 25 "$OUT/$phase.log"
done

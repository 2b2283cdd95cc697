#!/bin/sh
# Every benchmark at the scale docs/results.md reports (2 CPU cores, about two hours in all), one after the
# other so that none disturbs another's timings. Each prints one JSON line into runs/bench/NAME.json.
# Usage: sh benchmarks/run_all.sh [name ...]   (default: all, in this order)
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mkdir -p runs/bench
run() {
    name=$1; shift
    echo "== $name: $*" >&2
    start=$(date +%s)
    "$PY" "$@" > "runs/bench/$name.json" 2> "runs/bench/$name.err"
    echo "== $name: exit $? after $(( $(date +%s) - start )) s" >&2
}
all="zo_step zo_distributed prune quzo mazo adazeta pipeline sst2-adamw sst2-mezo"
for name in ${*:-$all}; do
    case $name in
    zo_step) run zo_step benchmarks/zo_step.py ;;
    zo_distributed) run zo_distributed benchmarks/zo_distributed.py ;;
    prune) run prune benchmarks/prune.py --nsamples 32 --seqlen 256 --ppl-seqlen 512 --ppl-windows 16 --zs-n 50 ;;
    quzo) run quzo benchmarks/quzo.py --tasks sst2,wic --steps 60 --batch-size 8 --num-dev 64 --num-test 200 \
              --out runs/bench/quzo-runs ;;
    mazo) run mazo benchmarks/mazo.py --steps 60 --batch-size 8 --fo-batch-size 8 --num-dev 32 --num-test 100 \
              --seeds 16 --reps 3 --calib-examples 32 --out runs/bench/mazo-runs ;;
    adazeta) run adazeta benchmarks/adazeta.py --budget 768 --num-train 64 --num-val 48 --num-test 128 --points 3 \
                 --max-q 8 --out runs/bench/adazeta-runs ;;
    pipeline) run pipeline benchmarks/pipeline.py --steps 60 --batch-size 8 --ppl-windows 8 --no-dense --out runs/bench/pipeline-runs ;;
    sst2-adamw) run sst2-adamw -m zolm finetune --model smollm2-135m --task sst2 --method fo-adamw \
                    --lr 1e-5 --steps 60 --batch-size 8 --eval-every 30 --num-dev 64 --num-test 200 \
                    --no-eval-before --data-dir ../shared/data \
                    --out runs/sst2-adamw --overwrite ;;
    sst2-mezo) run sst2-mezo -m zolm finetune --model smollm2-135m --task sst2 --method mezo \
                   --lr 3e-5 --steps 700 --batch-size 16 --eval-every 100 --num-dev 500 --data-dir ../shared/data \
                   --out runs/sst2-mezo --overwrite ;;
    *) echo "unknown benchmark $name; valid: $all" >&2; exit 2 ;;
    esac
done

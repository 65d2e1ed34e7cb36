#!/usr/bin/env bash
# The speed table still to be measured on an AVX2-only CPU (no AVX-512, no VNNI, no bf16; e.g. AMD Zen 3): every
# SD 1.5-architecture row the "fast on every CPU" targets need, then the few-step models, each run side by side with
# the peers on that same machine. Run it first thing on such a machine, idle, in the background:
#
#   nohup perf/avx2-table.sh > perf/cache/avx2-table.log 2>&1 &
#
# It takes hours on 2 cores (the exports, the in-place int8 stage and about 15 measured processes); every export is
# cached, so a run that is stopped resumes where it was with the same command. Reports: perf/RESULTS-avx2*.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv-dev/bin/python}

if grep -q -E 'avx512f|avx512_bf16|amx_tile' /proc/cpuinfo; then
  echo "this CPU has AVX-512 (or bf16/AMX): the table is for an AVX2-only machine; on this one use the bench directly" >&2
  exit 2
fi

# SD 1.5 architecture, 512x512, 20 steps. Peers at their defaults (f32 on this CPU), leansd exact and fast modes.
full_peers=optimum-ov-fp32,optimum-ov-int8,optimum-ort-fp32,diffusers-pt-fp32,leansd-ov-fp32,leansd-ort-fp32,leansd-ov-fp32-fast02-dc5-tome,leansd-ov-fp32-fast02-dc5-tome-lowmem,leansd-ort-int8-fast-dc5,leansd-ov-int8-fast02-dc5-inplace,leansd-ov-int8-fast02-dc5-inplace-lowmem
"$PY" perf/bench.py --prepare-only --peers "$full_peers"
"$PY" perf/bench.py --reuse-exports --repeats 2 --images 2 --output perf/RESULTS-avx2.md --peers "$full_peers"
# The deciding rows again, three fresh processes each (the cold figure is their median). Optimum's int8 files are here
# because they may be the fastest peer on such a CPU (they were under an f32 proxy on Zen 4: perf/RESULTS-f32proxy-zen4.md).
"$PY" perf/bench.py --reuse-exports --repeats 2 --images 2 --processes 3 --output perf/RESULTS-avx2-3proc.md \
  --peers optimum-ov-fp32,optimum-ov-int8,leansd-ov-fp32-fast02-dc5-tome,leansd-ov-fp32-fast02-dc5-tome-lowmem,leansd-ov-int8-fast02-dc5-inplace,leansd-ov-int8-fast02-dc5-inplace-lowmem

# Few-step models: the target is the fastest warm image on the machine.
"$PY" perf/bench.py --config perf/configs/turbo.json --images 3 --output perf/RESULTS-turbo-avx2.md \
  --peers diffusers-pt-fp32,optimum-ov-fp32-dynamic,leansd-ov-fp32,leansd-ov-fp32-tinyvae
"$PY" perf/bench.py --config perf/configs/lcm.json --images 3 --output perf/RESULTS-lcm-avx2.md \
  --peers optimum-ov-fp32-dynamic,leansd-ov-fp32-tinyvae
"$PY" perf/bench.py --config perf/configs/lcm-distilled.json --repeats 2 --images 3 --output perf/RESULTS-lcm-distilled-avx2.md \
  --peers optimum-ov-fp32,leansd-ov-fp32-ir-tinyvae-export

#!/usr/bin/env bash
# Headless load test against a running klein-serve; starts nothing else. Reports go to $OUT.
#   loadtest/run.sh http://127.0.0.1:8000 [users] [run-time] [shape]      (KLEIN_API_KEY for keyed services)
set -euo pipefail
host=${1:?usage: loadtest/run.sh URL [users] [run-time] [ramp|burst|soak|drain]}
users=${2:-8}
run_time=${3:-60s}
shape=${4:-}
exec klein loadtest --host "$host" --users "$users" --run-time "$run_time" ${shape:+--shape "$shape"} --out "${OUT:-loadtest-out}"

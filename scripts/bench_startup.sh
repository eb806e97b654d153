#!/bin/bash
# Start-up figures (issue 10): time from `max serve` (defaults; run `max warm-cache` first) to /health 200, RSS at
# ready, and a c=16 load sent at ready against the same load a minute later. Use random prompts (pass
# `--input-len 64`): with fixed prompts the later run finds the earlier one's prompts in the prefix cache.
#   scripts/bench_startup.sh --input-len 64
cd "$(dirname "$0")/.."
t0=$(date +%s.%N)
.venv/bin/max serve --port 8123 > "${TMPDIR:-/tmp}/maxjax-startup.log" 2>&1 &
pid=$!
until curl -s -o /dev/null -w "%{http_code}" 127.0.0.1:8123/health 2>/dev/null | grep -q 200; do sleep 0.05; done
t1=$(date +%s.%N)
echo "health 200 after $(awk "BEGIN {print $t1 - $t0}") s; RSS $(ps -o rss= -p "$pid") KiB"
B=".venv/bin/max benchmark --base-url http://127.0.0.1:8123/v1 --concurrency 16 --num-requests 64 --output-len 64 $*"
$B 2>/dev/null | tail -4
sleep 60
$B 2>/dev/null | tail -4
grep "ready [0-9]" "${TMPDIR:-/tmp}/maxjax-startup.log" | tail -1 | cut -c1-300
kill "$pid"

#!/usr/bin/env bash
# Runs the README's quickstart for real, as CI does on a clean clone: `make run` in the
# background, the publish commands it prints, the CID visible, then a graceful shutdown.
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp /tmp/quickstart.XXXXXX.log)
rm -rf var
setsid make run >"$log" 2>&1 &
make_pid=$!   # its own session and process group; `userpub run` is its child (exec'd by make)
run_pid() { pgrep -P "$make_pid" | head -n1; }
cleanup() {   # only what this script started, by process id
    local run; run=$(run_pid || true)
    if [ -n "$run" ]; then pkill -KILL -P "$run" 2>/dev/null || true; fi   # the daemons
    kill -KILL -- "-$make_pid" 2>/dev/null || true                          # make, userpub run
}
trap cleanup EXIT

for _ in $(seq 1 240); do grep -q "listening on https://" "$log" && break; sleep 0.5; done
grep -q "listening on https://" "$log" || { echo "quickstart: the service did not start"; cat "$log"; exit 1; }
for _ in $(seq 1 120); do [ "$(grep -c 'publisher ready' "$log")" -ge 2 ] && break; sleep 0.5; done

# The commands exactly as `make run` printed them.
env_line=$(grep -m1 '^  \. .*env\.sh$' "$log")
publish_line=$(grep -m1 'userpub client publish' "$log")
cid_line=$(grep -m1 '^  CID=' "$log")
curl_publish=$(grep -m1 -A1 'curl .*--cert' "$log" | tr -d '\\\n')
wait_line=$(grep -m1 'userpub wait' "$log")
echo "quickstart: $publish_line"
eval "$env_line"
path=$(eval "$publish_line")
echo "quickstart: published at $path"
test -x "$path/run.sh"
eval "$cid_line"
CID=${CID/demo\//demo-curl/}
answer=$(eval "$curl_publish")
echo "quickstart: curl publish answered: $answer"
test "$answer" = "OK"
visible=$(eval "${wait_line} --interval 0.5")
echo "quickstart: visible at $visible"
test -f "$visible/README"

kill -TERM "$(run_pid)"
status=0
wait "$make_pid" || status=$?
grep -q "stopping ingest" "$log"
tail -n1 "$log" | grep -q "userpub.supervisor.* INFO stopped$" || { echo "quickstart: no final 'stopped' line"; tail -n5 "$log"; exit 1; }
if grep -E "\] (ERROR|CRITICAL) |^Traceback" "$log"; then echo "quickstart: the healthy service logged errors"; exit 1; fi
echo "quickstart: make run exited with $status"
test "$status" -eq 0
echo "quickstart: OK"

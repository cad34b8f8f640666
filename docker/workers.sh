#!/bin/sh
# GADGETRON_REMOTE_WORKER_COMMAND for docker/compose.yml: print the workers as the JSON list of
# "host:port" that Gadgetron's distributed nodes expect. PISF_WORKERS: space-separated host:port.
set -eu
out=""
for worker in ${PISF_WORKERS:-worker1:9002 worker2:9002}; do
    out="${out:+$out,}\"$worker\""
done
printf '[%s]\n' "$out"

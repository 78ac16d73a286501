#!/usr/bin/env bash
# Run every benchmark in turn; arguments (e.g. --quick) go to each one.
# Prints each benchmark's final line; progress goes to bench/results/<name>.log.
# Exit status: 0 if every target was met, 1 if any missed, 2 if any benchmark failed to run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
mkdir -p bench/results && printf "*\n" > bench/results/.gitignore
status=0
for name in accept_rate soap_e2e urgency fanout sftp_large forwarding scaleout; do
    echo "== $name $*" >&2
    "$PY" "bench/$name.py" "$@" >"bench/results/$name.out" 2>"bench/results/$name.log"
    rc=$?
    line=$(tail -n 1 "bench/results/$name.out")
    if [[ $rc -ne 0 && $rc -ne 1 ]]; then
        echo "$name: did not finish (exit $rc); see bench/results/$name.log"
        status=2
        continue
    fi
    echo "$line"
    if [[ $rc -eq 1 && $status -eq 0 ]]; then status=1; fi
done
exit $status

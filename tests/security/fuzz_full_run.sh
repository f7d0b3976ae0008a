#!/bin/sh
# The full fuzz run the issue asks for: 100,000 malformed JSON bodies, 100,000 malformed msgpack
# bodies and 100,000 malformed batches at central (about 20 minutes on 2 cores). The counts per
# test (executed, distinct, seed) are printed in the "fuzz counts" section at the end.
#   tests/security/fuzz_full_run.sh [LOG]    (default log: /tmp/fuzz-full.log)
# STORELINK_FUZZ_EXAMPLES overrides the count, STORELINK_FUZZ_SEED fixes the seeds.
set -eu
cd "$(dirname "$0")/../.."
log="${1:-/tmp/fuzz-full.log}"
start=$(date +%s)
status=0
STORELINK_FUZZ_EXAMPLES="${STORELINK_FUZZ_EXAMPLES:-100000}" \
    .venv/bin/pytest tests/security/test_fuzz_ingest.py --timeout=0 -p no:randomly -q \
    >"$log" 2>&1 || status=$?
echo "wall time: $(($(date +%s) - start))s, pytest exit status $status" >>"$log"
tail -n 20 "$log"
exit "$status"

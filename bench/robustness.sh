#!/usr/bin/env bash
# Long runs of the robustness engine (tests/robustness.rs): SEEDS (space-separated; default: five
# seeds drawn from the clock) of STEPS random steps each (default 60). Each seed's summary line
# (operations, kills, restores compared) is appended to bench/robustness.md; a failing seed stops
# the script with its rerun command. Needs what the tests need (scripts/install-deps.sh).
#
#   bash bench/robustness.sh                      # five fresh seeds × 60 steps (≈ 5 min each)
#   SEEDS="0x2 0x3" STEPS=100 bash bench/robustness.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-60}
if [ -z "${SEEDS:-}" ]; then
  SEEDS=""
  for i in 1 2 3 4 5; do SEEDS+="$(printf '0x%x ' $(( ($(date +%s%N) / 1000 + i * 7919) & 0xffffffff )))"; done
fi
out=bench/robustness.md
[ -f "$out" ] || printf '# Robustness engine runs\n\nEach line: one seed of `tests/robustness.rs` (`bench/robustness.sh`), its operations and how many restores were compared with the ledger row for row.\n\n' > "$out"
cargo test -p tidemark-e2e --test robustness --no-run -q 2>/dev/null
total_steps=0; total_restores=0
for seed in $SEEDS; do
  log=$(mktemp /tmp/robustness-XXXXXX.log)
  started=$(date +%s)
  if ! TIDEMARK_ROBUSTNESS_SEED=$seed TIDEMARK_ROBUSTNESS_STEPS=$STEPS RUST_BACKTRACE=0 \
      cargo test -q -p tidemark-e2e --test robustness -- --nocapture >"$log" 2>&1; then
    echo "robustness: seed $seed FAILED (log $log); rerun:" >&2
    echo "  TIDEMARK_ROBUSTNESS_SEED=$seed TIDEMARK_ROBUSTNESS_STEPS=$STEPS cargo test -p tidemark-e2e --test robustness -- --nocapture" >&2
    grep -v '^robustness 0x' "$log" | tail -40 >&2
    printf -- '- %s seed %s, %s steps: **FAILED** (see the rerun command above)\n' "$(date -u +%F)" "$seed" "$STEPS" >> "$out"
    exit 1
  fi
  summary=$(grep -m1 '^robustness seed' "$log")
  restores=$(sed -n 's/.*restores_checked: \([0-9]*\).*/\1/p' <<<"$summary")
  total_steps=$((total_steps + STEPS)); total_restores=$((total_restores + restores))
  printf -- '- %s `%s` in %ss\n' "$(date -u +%F)" "$summary" "$(( $(date +%s) - started ))" >> "$out"
  echo "$summary"
  rm -f "$log"
done
echo "robustness: $total_steps steps, $total_restores restores compared row for row, no inexact restore"

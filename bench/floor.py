#!/usr/bin/env python3
"""Adds the PITR replay floor (run.sh PITR_FLOOR=1) to a table printed by report.py.

  floor.py JSONL dataset < TABLE > TABLE

Reads report.py's Markdown for one dataset on stdin and prints it with one more row after
"PITR: of which replay to promotion" — "PITR: replay floor with restore_command = cp of plain
WAL (s)", from the step "floor" that run.sh records for the tidemark variant it measured — and,
after the target table, the best PITR ratio any restore_command could reach:
(tidemark restore time + floor) / pgBackRest's PITR time, per pgBackRest variant. Without a
"floor" step in JSONL the table passes through unchanged.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import fmt_num, load, variant_label  # noqa: E402

ROW = "PITR: replay floor with restore_command = cp of plain WAL (s)"
PITR_GOAL = 0.7


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    path, dataset = sys.argv[1:]
    rows = load(path, dataset)
    text = sys.stdin.read()
    floors = {v: r for (v, s), r in rows.items() if s == "floor" and "floor_recovery_s" in r}
    if not floors:
        sys.stdout.write(text)
        return

    def get(v, step, field):
        return rows.get((v, step), {}).get(field)

    variants = [v for (v, _s) in rows if v.startswith(("tidemark", "pgbackrest"))]
    by_label = {variant_label(v): v for v in variants}
    pgbrs = sorted({v for v in variants if v.startswith("pgbackrest")},
                   key=lambda v: (not v.startswith("pgbackrest-gz"), v))
    out, cols, in_targets = [], [], False
    for line in text.split("\n"):
        if line.startswith("| | ") and not cols:
            cols = [by_label.get(c.strip()) for c in line.strip().strip("|").split("|")[1:]]
        if line.startswith("| target (tidemark / pgBackRest)"):
            in_targets = True
        if in_targets and line == "":
            in_targets = False
            out.append(line)
            for t, r in sorted(floors.items()):
                fl, rs = r["floor_recovery_s"], get(t, "pitr", "restore_s")
                if rs is None:
                    continue
                out.append(
                    f"Replay floor ({variant_label(t)}'s restore of the same backup, not timed; "
                    f"{r.get('floor_wal_files')} WAL files from the backup's start on extracted "
                    f"beforehand with wal-fetch, {r.get('floor_wal_bytes', 0) / (1 << 20):,.0f} MiB; "
                    f"restore_command = 'cp <dir>/%f %p'; data verified: {r.get('floor_verified')}): "
                    f"start to promotion **{fl:.1f} s**, against {fmt_num(get(t, 'pitr', 'recovery_s'))} s "
                    f"with {variant_label(t)}'s own restore_command. The best PITR ratio any "
                    f"restore_command could reach with this restore, (restore {rs:.1f} s + floor "
                    f"{fl:.1f} s) / pgBackRest's PITR:")
                out.append("")
                for p in pgbrs:
                    b = get(p, "pitr", "pitr_s")
                    if b:
                        x = (rs + fl) / b
                        out.append(f"- / {variant_label(p)} ({b:.1f} s): **{x:.2f}×** "
                                   f"({'within' if x <= PITR_GOAL else 'above'} the ≤ {PITR_GOAL}× target)")
                out.append("")
            continue
        out.append(line)
        if line.startswith("| PITR: of which replay to promotion (s) |") and cols:
            out.append(f"| {ROW} | " + " | ".join(
                fmt_num(floors[v]["floor_recovery_s"]) if v in floors else "–" for v in cols) + " |")
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()

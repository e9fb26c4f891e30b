#!/usr/bin/env python3
"""Adds the PITR replay floor (run.sh PITR_FLOOR=1) and the restore's disk floor (DISK_FLOOR=1)
to a table printed by report.py.

  floor.py JSONL dataset < TABLE > TABLE

Reads report.py's Markdown for one dataset on stdin and prints it with one more row after
"PITR: of which replay to promotion" — "PITR: replay floor with restore_command = cp of plain
WAL (s)", from the step "floor" that run.sh records for the tidemark variant it measured — and,
after the target table, the best PITR ratio any restore_command could reach:
(tidemark restore time + floor) / pgBackRest's PITR time, per pgBackRest variant. From a
"diskfloor" step (bench/disk_floor.py's JSON), a paragraph after the target table: the disk's
time to write the restored bytes, to read the packs, and both at once, against tidemark's
restore and the ≤ 0.67× restore target of each pgBackRest variant (medians of the alternating
rounds when there are rounds). Without those steps the table passes through unchanged.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import fmt_num, load, variant_label  # noqa: E402

ROW = "PITR: replay floor with restore_command = cp of plain WAL (s)"
PITR_GOAL = 0.7
RESTORE_GOAL = 0.67


def disk_floor_lines(rows, pgbrs):
    """The disk-floor paragraph, or [] without a "diskfloor" step."""
    found = [(v, r) for (v, s), r in rows.items() if s == "diskfloor" and "both_s" in r]
    if not found:
        return []
    t, d = found[0]

    def restore_s(v):
        m = rows.get((v, "restores"), {}).get("median_s")
        return (m, "median of the rounds") if m else (rows.get((v, "pitr"), {}).get("restore_s"), "single")

    mib = 1 << 20
    rs, how = restore_s(t)
    lines = [
        f"Disk floor for the restore (bench/disk_floor.py, page cache dropped before each, best of "
        f"{d.get('repeat')}): writing the {d['write_bytes'] / mib:,.0f} MiB {variant_label(t)} "
        f"restores, with O_DIRECT from {d.get('threads')} threads then fsync, **{d['write_s']:.2f} s**; "
        f"reading its repository's {d['read_bytes'] / mib:,.0f} MiB of packs cold "
        f"{d['read_s']:.2f} s; both at once, as a restore does them, **{d['both_s']:.2f} s**. "
        + (f"{variant_label(t)}'s restore ({how}) {rs:.2f} s is {rs / d['both_s']:.2f}× that floor."
           if rs else ""),
        "",
    ]
    for p in pgbrs:
        b, bhow = restore_s(p)
        if b:
            goal = RESTORE_GOAL * b
            lines.append(
                f"- ≤ {RESTORE_GOAL}× of {variant_label(p)}'s restore ({bhow}, {b:.2f} s) is "
                f"{goal:.2f} s: {'above' if goal >= d['both_s'] else 'below'} the disk floor "
                f"({goal / d['both_s']:.2f}× of it)")
    lines.append("")
    return lines


def main():
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    path, dataset = sys.argv[1:]
    rows = load(path, dataset)
    text = sys.stdin.read()
    floors = {v: r for (v, s), r in rows.items() if s == "floor" and "floor_recovery_s" in r}
    has_disk = any(s == "diskfloor" for (_v, s) in rows)
    if not floors and not has_disk:
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
            out.extend(disk_floor_lines(rows, pgbrs))
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
        if line.startswith("| PITR: of which replay to promotion (s) |") and cols and floors:
            out.append(f"| {ROW} | " + " | ".join(
                fmt_num(floors[v]["floor_recovery_s"]) if v in floors else "–" for v in cols) + " |")
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()

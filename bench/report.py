#!/usr/bin/env python3
"""Collects benchmark measurements (one JSON object per line) and renders them as Markdown.

  report.py record JSONL dataset variant step [--measure M.json] [--tool TOOL.json] [key=value ...]
      appends one line merging the measure.py result, the tool's own JSON output and extras
  report.py table JSONL dataset [key=value ...]
      prints the absolute-numbers table, the ratio table against the targets and, when present,
      the chunk-size table; the key=value pairs are printed as the run's header

Variants are named tidemark-zN (zstd level N) and pgbackrest-gz6 / pgbackrest-zstN. Steps:
full, incr (the nightly after the 1% update), pitr (restore + recovery), restore1, restore2, ...
(RESTORE_ROUNDS: restore only, summarised as their median), wal, chunks, dataset.
"""
import json
import sys

MIB = 1 << 20
GIB = 1 << 30

# (label, step, field, tidemark target ratio or None); ratio = tidemark / pgBackRest.
TARGETS = [
    ("full backup time", "full", "wall_s", 0.6),
    ("full backup stored bytes", "full", "stored_bytes", 1.05),
    ("nightly (1% update) time", "incr", "wall_s", 0.4),
    ("nightly (1% update) stored bytes", "incr", "stored_bytes", 0.5),
    ("restore time", "pitr", "restore_s", 0.67),
    ("PITR time (restore + replay to promotion)", "pitr", "pitr_s", 0.7),
    ("restore time, median of the alternating rounds", "restores", "median_s", 0.67),
]


def load(path, dataset):
    rows = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if r.get("dataset") != dataset:
                continue
            key = (r["variant"], r["step"])
            rows.setdefault(key, {}).update(r)
    # RESTORE_ROUNDS: steps restore1, restore2, ... of a variant, summarised as step "restores".
    rounds = {}
    for (v, s), r in rows.items():
        if s.startswith("restore") and s[len("restore"):].isdigit() and r.get("wall_s"):
            rounds.setdefault(v, []).append(r["wall_s"])
    for v, times in rounds.items():
        times.sort()
        n = len(times)
        median = times[n // 2] if n % 2 else (times[n // 2 - 1] + times[n // 2]) / 2
        rows[(v, "restores")] = {"median_s": median, "min_s": times[0], "max_s": times[-1], "n": n}
    return rows


def record(args):
    path, dataset, variant, step = args[:4]
    rest = args[4:]
    r = {"dataset": dataset, "variant": variant, "step": step}
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("--measure", "--tool"):
            with open(rest[i + 1]) as f:
                text = f.read().strip()
            # Tools may print log lines before their JSON; take the last JSON object line.
            obj = None
            for line in reversed(text.splitlines()):
                line = line.strip()
                if line.startswith("{"):
                    obj = json.loads(line)
                    break
            if obj is None:
                raise SystemExit(f"no JSON object in {rest[i + 1]}")
            r.update(obj)
            i += 2
            continue
        k, _, v = a.partition("=")
        try:
            r[k] = json.loads(v)
        except ValueError:
            r[k] = v
        i += 1
    with open(path, "a") as f:
        f.write(json.dumps(r) + "\n")


def variant_label(v):
    if v.startswith("tidemark-enc-z"):
        return f"tidemark encrypted zstd-{v[len('tidemark-enc-z'):]}"
    if v.startswith("tidemark-repl-z"):
        return f"tidemark replication zstd-{v[len('tidemark-repl-z'):]}"
    if v.startswith("tidemark-z"):
        return f"tidemark zstd-{v[len('tidemark-z'):]}"
    if v.startswith("pgbackrest-gz"):
        return f"pgBackRest gz-{v[len('pgbackrest-gz'):]}"
    if v.startswith("pgbackrest-zst"):
        return f"pgBackRest zst-{v[len('pgbackrest-zst'):]}"
    return v


def fmt_num(x, digits=1):
    if x is None:
        return "–"
    if isinstance(x, int) or float(x).is_integer() and abs(x) >= 100:
        return f"{int(x):,}"
    return f"{x:,.{digits}f}"


def table(args):
    path, dataset = args[:2]
    meta = [a.partition("=") for a in args[2:]]
    rows = load(path, dataset)
    variants = []
    for (v, _s) in rows:
        if v not in variants and (v.startswith("tidemark") or v.startswith("pgbackrest")):
            variants.append(v)
    tms = sorted([v for v in variants if v.startswith("tidemark")])
    pgbrs = sorted([v for v in variants if v.startswith("pgbackrest")],
                   key=lambda v: (not v.startswith("pgbackrest-gz"), v))
    cols = tms + pgbrs

    def get(v, step, field):
        return rows.get((v, step), {}).get(field)

    def mib(x):
        return None if x is None else x / MIB

    def rate(v, step):
        b, s = get(v, step, "logical_bytes"), get(v, step, "wall_s")
        return None if not b or not s else b / MIB / s

    def rss(v, step):
        a, b = get(v, step, "maxrss_kb"), get(v, step, "tree_peak_kb")
        if a is None:
            return "–"
        return f"{a / 1024:,.0f} / {b / 1024:,.0f}"

    def cpu(v, step):
        u, s = get(v, step, "cpu_user_s"), get(v, step, "cpu_sys_s")
        return None if u is None else u + s

    def others(v, step):
        c, busy = cpu(v, step), get(v, step, "sys_busy_s")
        return None if c is None or busy is None else max(busy - c, 0.0)

    def per_gib(v, step):
        o, b = get(v, step, "objects"), get(v, step, "new_chunk_bytes")
        return None if not o or not b else o / (b / GIB)

    out = []
    ds = rows.get(("source", "dataset"), {})
    out.append(f"### Dataset `{dataset}`\n")
    for k, _, v in meta:
        out.append(f"- {k}: {v}")
    if ds:
        out.append(f"- data directory: {fmt_num(mib(ds.get('pgdata_bytes')))} MiB "
                   f"(pgbench_accounts {fmt_num(mib(ds.get('accounts_bytes')))} MiB); "
                   f"1% update wrote {fmt_num(mib(ds.get('update_wal_bytes')))} MiB of WAL; "
                   f"PITR replays {fmt_num(mib(ds.get('replay_wal_bytes')))} MiB of WAL "
                   f"written after the nightly backup")
    out.append("")
    lines = [
        ("full backup: time (s)", lambda v: fmt_num(get(v, "full", "wall_s"))),
        ("full backup: MiB/s (logical bytes / time)", lambda v: fmt_num(rate(v, "full"))),
        ("full backup: stored MiB", lambda v: fmt_num(mib(get(v, "full", "stored_bytes")))),
        ("full backup: objects written", lambda v: fmt_num(get(v, "full", "objects"), 0)),
        ("full backup: peak RSS MiB (largest process / process tree)", lambda v: rss(v, "full")),
        ("full backup: CPU s (user+sys)", lambda v: fmt_num(cpu(v, "full"))),
        ("nightly after 1% update: time (s)", lambda v: fmt_num(get(v, "incr", "wall_s"))),
        ("nightly: new data MiB before compression (tidemark: new chunks; pgBackRest: changed files)",
         lambda v: fmt_num(mib(get(v, "incr", "new_chunk_bytes")))),
        ("nightly: stored MiB", lambda v: fmt_num(mib(get(v, "incr", "stored_bytes")))),
        ("nightly: objects written", lambda v: fmt_num(get(v, "incr", "objects"), 0)),
        ("nightly: peak RSS MiB (largest / tree)", lambda v: rss(v, "incr")),
        ("nightly: CPU s (user+sys)", lambda v: fmt_num(cpu(v, "incr"))),
        ("restore (latest): time (s)", lambda v: fmt_num(get(v, "pitr", "restore_s"))),
        ("restore: peak RSS MiB (largest / tree)", lambda v: rss(v, "pitr")),
        ("restore: CPU s (user+sys)", lambda v: fmt_num(cpu(v, "pitr"))),
        ("restore, median of the alternating rounds [min–max] (s)", lambda v: (
            f"{fmt_num(get(v, 'restores', 'median_s'), 2)} [{fmt_num(get(v, 'restores', 'min_s'), 2)}–"
            f"{fmt_num(get(v, 'restores', 'max_s'), 2)}] (n={get(v, 'restores', 'n')})"
            if get(v, "restores", "n") else "–")),
        ("PITR: restore + replay + promotion (s)", lambda v: fmt_num(get(v, "pitr", "pitr_s"))),
        ("PITR: of which replay to promotion (s)", lambda v: fmt_num(get(v, "pitr", "recovery_s"))),
        ("CPU s used meanwhile by PostgreSQL and others (full / nightly / restore)", lambda v: " / ".join(
            fmt_num(others(v, s)) for s in ("full", "incr", "pitr"))),
        ("restored data verified", lambda v: get(v, "pitr", "verified") or "–"),
        ("restore of the nightly to its consistency point: time (s)", lambda v: fmt_num(get(v, "delta", "full_immediate_s"))),
        ("the same over the copy after a 1% change, --delta: time (s)", lambda v: fmt_num(get(v, "delta", "delta_s"))),
        ("delta: MiB written (tidemark's report)", lambda v: fmt_num(mib(get(v, "delta", "delta_written_bytes")))),
        ("delta: peak RSS MiB (largest / tree)", lambda v: rss(v, "delta")),
        ("delta: restored data verified (full / delta)", lambda v: get(v, "delta", "verified") or "–"),
        ("WAL archive: MiB stored / objects", lambda v: (
            f"{fmt_num(mib(get(v, 'wal', 'stored_bytes')))} / {fmt_num(get(v, 'wal', 'objects'), 0)}"
            if get(v, "wal", "stored_bytes") is not None else "–")),
        ("objects per GiB of new data (full / nightly)", lambda v: (
            f"{fmt_num(per_gib(v, 'full'))} / {fmt_num(per_gib(v, 'incr'))}")),
    ]
    out.append("| | " + " | ".join(variant_label(v) for v in cols) + " |")
    out.append("|---|" + "---:|" * len(cols))
    for label, f in lines:
        out.append(f"| {label} | " + " | ".join(f(v) for v in cols) + " |")
    out.append("")

    if tms and pgbrs:
        hdr = ["target (tidemark / pgBackRest)", "goal"]
        for t in tms:
            for p in pgbrs:
                hdr.append(f"{variant_label(t)} / {variant_label(p)}")
        out.append("| " + " | ".join(hdr) + " |")
        out.append("|---|---:|" + "---:|" * (len(hdr) - 2))
        for label, step, field, goal in TARGETS:
            cells = [label, f"≤ {goal}×"]
            for t in tms:
                for p in pgbrs:
                    a, b = get(t, step, field), get(p, step, field)
                    if a is None or not b:
                        cells.append("–")
                    else:
                        r = a / b
                        cells.append(f"{r:.2f}× {'✅' if r <= goal else '❌'}")
            out.append("| " + " | ".join(cells) + " |")
        cells = ["objects per GiB of new data (nightly)", "≤ 64"]
        for t in tms:
            x = per_gib(t, "incr")
            ok = "" if x is None else (" ✅" if x <= 64 else " ❌")
            cells.extend([f"{fmt_num(x)}{ok}"] + [""] * (len(pgbrs) - 1))
        out.append("| " + " | ".join(cells) + " |")
        cells = ["objects per GiB of new data (full)", "≤ 64"]
        for t in tms:
            x = per_gib(t, "full")
            ok = "" if x is None else (" ✅" if x <= 64 else " ❌")
            cells.extend([f"{fmt_num(x)}{ok}"] + [""] * (len(pgbrs) - 1))
        out.append("| " + " | ".join(cells) + " |")
        out.append("")

    chunk_rows = sorted([r for (v, s), r in rows.items() if s.startswith("chunks")],
                        key=lambda r: r.get("order", 0))
    if chunk_rows:
        sizes = sorted({int(k) for r in chunk_rows for k in r["changed_bytes"]},
                       key=lambda s: (s == 0, s))
        out.append("Share of the relation's bytes in changed fixed-size chunks:\n")
        out.append("| relation | update | " + " | ".join(
            "whole files" if s == 0 else f"{s // 1024} KiB" for s in sizes) + " |")
        out.append("|---|---|" + "---:|" * len(sizes))
        for r in chunk_rows:
            tot = r["total_bytes"]
            out.append(f"| {r['relation']} ({tot / MIB:,.0f} MiB) | {r['update']} | " + " | ".join(
                f"{r['changed_bytes'][str(s)] / tot:.1%}" for s in sizes) + " |")
        out.append("")
    print("\n".join(out))


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "record":
        record(args)
    elif cmd == "table":
        table(args)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()

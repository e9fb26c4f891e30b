#!/usr/bin/env python3
"""Compares two copies of a PostgreSQL relation and reports, for several fixed chunk sizes, the
share of the new copy's bytes that lie in chunks that differ from the old copy.

A relation is its main-fork segment files <relfilenode>, <relfilenode>.1, ... (1 GiB each).
Chunks are cut at fixed offsets from the start of each segment file, as a fixed-size chunker
does; a chunk is "changed" when any byte differs or when it lies past the old copy's end (the
table grew). The share is changed bytes / bytes of the new copy. A chunk size of 0 means whole
files (file-level incremental, as pgBackRest's incr does).

Usage: blockdiff.py OLD_DIR NEW_DIR RELFILENODE [--sizes 8192,16384,65536] [--json]
"""
import argparse
import json
import os
import sys

PAGE = 8192
READ = 8 << 20


def segments(d, rel):
    out, i = [], 0
    while True:
        name = rel if i == 0 else f"{rel}.{i}"
        p = os.path.join(d, name)
        if not os.path.exists(p):
            return out
        out.append(name)
        i += 1


def changed_pages(old_path, new_path):
    """Returns (size of the new file, list of booleans: page i of the new file differs)."""
    flags = []
    size = os.path.getsize(new_path)
    with open(new_path, "rb") as nf:
        of = open(old_path, "rb") if os.path.exists(old_path) else None
        try:
            while True:
                nb = nf.read(READ)
                if not nb:
                    break
                ob = of.read(len(nb)) if of else b""
                if nb == ob:
                    flags.extend([False] * ((len(nb) + PAGE - 1) // PAGE))
                    continue
                nv, ov = memoryview(nb), memoryview(ob)
                for off in range(0, len(nb), PAGE):
                    flags.append(nv[off:off + PAGE] != ov[off:off + PAGE])
        finally:
            if of:
                of.close()
    return size, flags


def diff(old_dir, new_dir, rel, sizes):
    for s in sizes:
        if s % PAGE:
            raise SystemExit(f"chunk size {s} is not a multiple of {PAGE}")
    total = 0
    changed = {s: 0 for s in sizes}
    changed_files = 0
    for name in segments(new_dir, rel):
        size, flags = changed_pages(os.path.join(old_dir, name), os.path.join(new_dir, name))
        total += size
        if any(flags):
            changed_files += size
        for s in sizes:
            if s == 0:
                continue
            per = s // PAGE
            for c in range(0, len(flags), per):
                if any(flags[c:c + per]):
                    changed[s] += min(s, size - c * PAGE)
    if 0 in changed:
        changed[0] = changed_files
    return total, changed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old_dir")
    ap.add_argument("new_dir")
    ap.add_argument("relfilenode")
    ap.add_argument("--sizes", default="8192,16384,65536")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    sizes = [int(x) for x in a.sizes.split(",")]
    total, changed = diff(a.old_dir, a.new_dir, a.relfilenode, sizes)
    if a.json:
        print(json.dumps({"total_bytes": total,
                          "changed_bytes": {str(s): changed[s] for s in sizes}}))
    else:
        for s in sizes:
            label = "whole file" if s == 0 else f"{s // 1024} KiB"
            share = changed[s] / total if total else 0.0
            print(f"{label:>10}: {changed[s]:>14} of {total} bytes changed ({share:.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

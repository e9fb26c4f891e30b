#!/usr/bin/env python3
"""Groups the samples of a `perf record --call-graph dwarf` profile of tidemark by pipeline stage.

  perf script -i PERF.DATA --no-inline -F comm,tid,period,ip,sym,dso | perfstages.py KIND [CPU_S]

KIND is `backup` (tidemark-agent backup --pgdata) or `restore` (tidemark-restore restore). Each
sample is put in the first stage whose rule matches its call chain (leaf first); the stages and
rules are listed in STAGES below, in the order they are tried. With CPU_S (the user+sys CPU
seconds of the same command measured without perf) each stage's share is also given in CPU
seconds; perf's own estimate (samples x period) is printed beside it. Prints a Markdown table,
then the top leaf symbols of each stage.

Rules look at function names only (the binaries need symbols; debug info makes the DWARF
unwinding work: build with CARGO_PROFILE_RELEASE_DEBUG=true). Kernel frames come from the
kernel's own unwinder, so a system call is attributed by the user-space frames above it.
"""
import collections
import re
import sys


def has(chain, *pats):
    return any(p in f for f in chain for p in pats)


def leaf_is(chain, *pats):
    return bool(chain) and any(p in chain[0] for p in pats)


SHA = ("sha2::sha256", "sha256_transform", "sha256::compress", "sha2::sha256::x86")
ZSTD = ("ZSTD_", "HUF_", "FSE_", "zstd::", "ZSTDMT_", "HIST_")
KERNEL_FSYNC = ("__x64_sys_fsync", "__x64_sys_fdatasync", "do_fsync")
KERNEL_READ = ("__x64_sys_read", "__x64_sys_pread64", "ksys_read", "ksys_pread64")
KERNEL_WRITE = ("__x64_sys_write", "__x64_sys_pwrite64", "ksys_write", "ksys_pwrite64")
KERNEL_META = ("__x64_sys_openat", "__x64_sys_close", "__x64_sys_linkat", "__x64_sys_link",
               "__x64_sys_renameat", "__x64_sys_rename", "__x64_sys_unlink", "__x64_sys_newfstatat",
               "__x64_sys_statx", "__x64_sys_mkdir", "__x64_sys_newfstat", "__x64_sys_fstat")
SCHED = ("futex", "schedule", "__x64_sys_sched_yield", "finish_task_switch", "try_to_wake_up",
         "parking_lot", "std::sys::sync", "tokio::runtime::park", "epoll_wait", "__x64_sys_epoll",
         "crossbeam", "tokio::runtime::scheduler", "std::thread::park")

def leaf_sha(chain):
    # The compression function is the leaf (or the frame just above a kernel interrupt).
    return any(p in f for f in chain[:2] for p in SHA)


BACKUP = [
    # Whole-pack hash: PackBuilder::finish -> PackId::of (the pack's key).
    ("pack sha256 (pack key)", lambda c: leaf_sha(c) and has(c, "PackId::of", "PackBuilder::finish", "pack::PackBuilder")),
    ("per-chunk sha256 (chunk id)", lambda c: leaf_sha(c) and has(c, "ChunkIds::id", "ChunkId::of", "store_chunk")),
    ("whole-file sha256", lambda c: leaf_sha(c) and has(c, "copy_files")),
    ("sha256, other callers", leaf_sha),
    ("zstd compression", lambda c: has(c, *ZSTD) or has(c, "Compressor::compress")),
    ("pack building (append frame, index)", lambda c: has(c, "PackBuilder", "encode_index")),
    ("file reading (read of the data directory)", lambda c: has(c, "read_full", "copy_files") and has(c, *KERNEL_READ)),
    ("upload: write + fsync + link of packs", lambda c: has(c, "upload_packs", "put_content_addressed", "put_via_tmp", "put_create", "store::local")),
    ("manifest, chunk log, parent", lambda c: has(c, "manifest", "chunk_log", "ChunkLog", "LogReader")),
    ("dedup map (recent chunks)", lambda c: has(c, "HashMap", "hashbrown") and has(c, "store_chunk")),
    ("file reading (read of the data directory)", lambda c: has(c, *KERNEL_READ)),
    ("fsync, other", lambda c: has(c, *KERNEL_FSYNC)),
    ("threads: wake-ups, futex, scheduler", lambda c: has(c, *SCHED)),
    ("PostgreSQL client (backup start/stop)", lambda c: has(c, "tokio_postgres", "postgres_protocol", "pg::")),
    ("other", lambda c: True),
]

RESTORE = [
    ("zstd decompression", lambda c: has(c, *ZSTD) or has(c, "decompress_exact")),
    ("chunk sha256 verification", lambda c: leaf_sha(c) and has(c, "decode_with", "ChunkIds::id", "ChunkId::of")),
    ("sha256, other callers (manifest)", leaf_sha),
    ("pwrite of restored files", lambda c: has(c, *KERNEL_WRITE) and has(c, "write_all_at", "read_and_write", "FileExt")),
    ("fsync of restored files and directories", lambda c: has(c, *KERNEL_FSYNC)),
    ("range reads of packs (open, pread, close)", lambda c: has(c, "get_range") or (has(c, *KERNEL_READ) and has(c, "store::local", "Store::get"))),
    ("file create / open / close (restored files)", lambda c: has(c, "create_file", "SafeDir", "safe_dir")),
    ("manifest load and decode", lambda c: has(c, "manifest", "LocalManifest", "ManifestIndex")),
    ("memory copies / allocation in the write path", lambda c: has(c, "read_and_write")),
    ("threads: wake-ups, futex, scheduler, spawn_blocking hand-offs", lambda c: has(c, *SCHED) or has(c, "spawn_blocking", "blocking::pool")),
    ("reads, other", lambda c: has(c, *KERNEL_READ)),
    ("writes, other", lambda c: has(c, *KERNEL_WRITE)),
    ("other", lambda c: True),
]


HEADER = re.compile(r"^(\S.*?)\s+(\d+)\s+(\d+)\s*$")


def samples(stream):
    """Yields (comm, period, [frames leaf first]) from `perf script -F comm,tid,period,ip,sym,dso`."""
    comm, period, chain = None, 0, []
    for line in stream:
        line = line.rstrip("\n")
        if not line.strip():
            if comm is not None:
                yield comm, period, chain
            comm, period, chain = None, 0, []
            continue
        if not line.startswith((" ", "\t")):
            m = HEADER.match(line)
            if m:
                comm, period, chain = m.group(1), int(m.group(3)), []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) == 2:
            sym = parts[1]
            sym = re.sub(r"\s+\([^()]*\)$", "", sym)  # the dso
            sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
            chain.append(sym)
    if comm is not None:
        yield comm, period, chain


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("backup", "restore"):
        raise SystemExit(__doc__)
    kind = sys.argv[1]
    cpu_s = float(sys.argv[2]) if len(sys.argv) > 2 else None
    rules = BACKUP if kind == "backup" else RESTORE
    per = collections.Counter()
    leaves = collections.defaultdict(collections.Counter)
    total = 0
    n = 0
    kernel = 0
    for comm, period, chain in samples(sys.stdin):
        n += 1
        total += period
        if chain and (chain[0].startswith(("__", "_raw", "native_", "do_", "copy_", "clear_"))
                      or "[kernel" in chain[0]):
            pass
        for name, rule in rules:
            if rule(chain):
                per[name] += period
                leaves[name][(chain[0] if chain else "?")[:90]] += period
                break
    if not total:
        raise SystemExit("no samples")
    print(f"{n:,} samples, perf's estimate {total / 1e9:.2f} CPU s"
          + (f"; measured without perf: {cpu_s:.2f} CPU s (user+sys)" if cpu_s else ""))
    print()
    print("| stage | share | CPU s" + (" (share x measured)" if cpu_s else " (perf)") + " |")
    print("|---|---:|---:|")
    order = []
    for name, _ in rules:
        if name not in order:
            order.append(name)
    for name in order:
        if not per[name]:
            continue
        share = per[name] / total
        secs = share * cpu_s if cpu_s else per[name] / 1e9
        print(f"| {name} | {share:.1%} | {secs:.2f} |")
    print()
    for name in order:
        if not per[name]:
            continue
        top = ", ".join(f"`{s}` {p / per[name]:.0%}" for s, p in leaves[name].most_common(4))
        print(f"- {name}: {top}")


if __name__ == "__main__":
    main()

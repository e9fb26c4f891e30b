#!/usr/bin/env python3
"""The disk's floor for a restore (run.sh DISK_FLOOR=1): what this machine's disk alone needs to
write a restored data directory and to read the repository it comes from, with no decoding,
hashing or PostgreSQL at all.

  disk_floor.py --dir DIR --write-bytes N --read DIR [--threads 4] [--repeat 2]

Three measurements, each `--repeat` times with the page cache dropped before each, the fastest
kept (a floor):
  write  N bytes of random data (not zeros, which a virtual disk may elide) into new files in DIR,
         one per thread, with O_DIRECT in 4 MiB writes, then fsync each: the way tidemark's
         restore writes relation files;
  read   every file under the --read directory (tidemark's packs), 1 MiB reads through the page
         cache, the files shared among the threads;
  both   the two at once, as a restore does them.
Prints one JSON object: write_s, read_s, both_s, write_bytes, read_bytes, threads, repeat.
Needs root (drop_caches) and a filesystem that takes O_DIRECT.
"""
import argparse
import json
import mmap
import os
import sys
import threading
import time

BLOCK = 4 << 20
READ = 1 << 20


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def writer(path, nbytes, buf):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        left = nbytes
        while left > 0:
            n = min(left, BLOCK)
            # O_DIRECT needs whole 4 KiB blocks: the last write is rounded up.
            n = (n + 4095) // 4096 * 4096
            os.write(fd, memoryview(buf)[:n])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)


def reader(files, lock):
    buf = bytearray(READ)
    while True:
        with lock:
            if not files:
                return
            path = files.pop()
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run(args, write, read):
    threads, paths = [], []
    if write:
        buf = mmap.mmap(-1, BLOCK)  # page-aligned, as O_DIRECT wants
        buf.write(os.urandom(BLOCK))
        per = -(-args.write_bytes // args.threads)
        for i in range(args.threads):
            p = os.path.join(args.dir, f"disk-floor-{i}")
            paths.append(p)
            threads.append(threading.Thread(target=writer, args=(p, per, buf)))
    if read:
        files = [os.path.join(r, f) for r, _d, fs in os.walk(args.read) for f in fs]
        lock = threading.Lock()
        threads += [threading.Thread(target=reader, args=(files, lock)) for _ in range(args.threads)]
    drop_caches()
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    for p in paths:
        os.unlink(p)
    return took


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", required=True)
    ap.add_argument("--write-bytes", type=int, required=True)
    ap.add_argument("--read", required=True)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    if args.write_bytes <= 0 or args.threads <= 0 or args.repeat <= 0:
        sys.exit("disk_floor.py: --write-bytes, --threads and --repeat must be positive")
    if not os.path.isdir(args.read):
        sys.exit(f"disk_floor.py: --read {args.read} is not a directory")
    read_bytes = sum(os.path.getsize(os.path.join(r, f))
                     for r, _d, fs in os.walk(args.read) for f in fs)
    out = {"write_bytes": args.write_bytes, "read_bytes": read_bytes,
           "threads": args.threads, "repeat": args.repeat}
    for name, w, r in (("write_s", True, False), ("read_s", False, True), ("both_s", True, True)):
        out[name] = round(min(run(args, w, r) for _ in range(args.repeat)), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

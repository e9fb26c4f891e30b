#!/usr/bin/env python3
"""Runs one command under /usr/bin/time -v and writes one JSON object describing the run.

Fields:
  wall_s          wall-clock seconds from start to exit
  rc              exit code of the command
  maxrss_kb       "Maximum resident set size" from time -v: the largest single process of the
                  command's tree (getrusage semantics: the max over processes, not a sum)
  tree_peak_kb    peak of the summed RSS of every process in the command's tree, sampled every
                  SAMPLE_S seconds (catches multi-process tools such as pgBackRest's process-max)
  cpu_user_s, cpu_sys_s
                  CPU seconds of the command and every descendant it waited for (time -v)
  sys_busy_s      CPU seconds the whole machine spent busy during the run (/proc/stat); minus the
                  command's own CPU this shows PostgreSQL's and other users' work meanwhile
  load1_start     1-minute load average when the command started

With --nice N the command runs in a session of its own whose scheduler autogroup gets nice N
(Linux with sched_autogroup_enabled: plain `nice` only orders processes within one session, so
it cannot lift a benchmark above other users' builds; an autogroup's nice can).

Usage: measure.py --out RESULT.json --stdout FILE --stderr FILE [--nice N] -- command args...
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

SAMPLE_S = 0.1


def proc_children():
    """Maps pid -> list of child pids, read from /proc."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: split after the last ')'.
        rest = stat[stat.rfind(b")") + 2:].split()
        kids.setdefault(int(rest[1]), []).append(int(d))
    return kids


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(root, skip):
    kids = proc_children()
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        if p not in skip:
            total += rss_kb(p)
        todo.extend(kids.get(p, []))
    return total


def cpu_busy_s():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def set_autogroup_nice(pid, nice):
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except OSError as e:
        print(f"measure.py: cannot set the autogroup nice of {pid}: {e}", file=sys.stderr)


def parse_time_v(path):
    out = {}
    keys = {
        "Maximum resident set size (kbytes)": ("maxrss_kb", int),
        "User time (seconds)": ("cpu_user_s", float),
        "System time (seconds)": ("cpu_sys_s", float),
        "Exit status": ("time_exit_status", int),
    }
    with open(path) as f:
        for line in f:
            k, _, v = line.strip().rpartition(": ")
            if k in keys:
                name, conv = keys[k]
                out[name] = conv(v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--stdout", required=True)
    ap.add_argument("--stderr", required=True)
    ap.add_argument("--nice", type=int)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd and a.cmd[0] == "--" else a.cmd
    if not cmd:
        ap.error("no command given")
    fd, tfile = tempfile.mkstemp(prefix="measure-time-")
    os.close(fd)
    with open("/proc/loadavg") as f:
        load1 = float(f.read().split()[0])
    busy0 = cpu_busy_s()
    t0 = time.monotonic()
    with open(a.stdout, "wb") as so, open(a.stderr, "wb") as se:
        p = subprocess.Popen(["/usr/bin/time", "-v", "-o", tfile, "--"] + cmd, stdout=so, stderr=se,
                             start_new_session=a.nice is not None)
        if a.nice is not None:
            set_autogroup_nice(p.pid, a.nice)
        peak = 0
        while p.poll() is None:
            # The time process itself is ~1 MB; leave it out of the tree sum.
            peak = max(peak, tree_rss_kb(p.pid, {p.pid}))
            time.sleep(SAMPLE_S)
        rc = p.returncode
    wall = time.monotonic() - t0
    busy = cpu_busy_s() - busy0
    res = {"wall_s": round(wall, 3), "rc": rc, "tree_peak_kb": peak,
           "sys_busy_s": round(busy, 2), "load1_start": load1}
    try:
        res.update(parse_time_v(tfile))
    finally:
        os.unlink(tfile)
    res["maxrss_kb"] = max(res.get("maxrss_kb", 0), 0)
    res["tree_peak_kb"] = max(peak, res["maxrss_kb"]) if peak else res["maxrss_kb"]
    with open(a.out, "w") as f:
        json.dump(res, f)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

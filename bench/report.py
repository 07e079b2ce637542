#!/usr/bin/env python3
# nbdkit-qcow2: turn the runs of bench/bench.sh into a markdown report.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   report.py OUT_DIR        (reads meta.tsv, workloads.tsv, runs.tsv)
#
# runs.tsv, one line per run: workload, server, round, ok|fail, IOPS,
# bytes/s, I/Os measured, seconds, server CPU ticks over the measured
# window, server VmHWM (KiB), client CPU ms, qemu-img check result.
#
# Ratios are computed per round (the four servers of a round run back
# to back, so slow drifts of the machine cancel out), then summarised
# as the median and min-max over the rounds.  "best qemu-nbd" is, per
# workload, the qemu-nbd configuration with the higher median
# throughput.  With a base build of the plugin (PLUGIN_BASE, server
# "base") a before/after table adds plugin/base, paired the same way.

import os
import statistics
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")

SERVER_LABEL = {
    "plugin": "A plugin",
    "qemu-threads": "B qemu-nbd threads",
    "qemu-uring": "C qemu-nbd io_uring",
    "raw": "D file (raw)",
    "base": "E base plugin",
    "qemu-native": "N qemu-nbd native",
    "raw-direct": "R raw O_DIRECT",
}
SERVER_DESC = {
    "plugin": "nbdkit + nbdkit-qcow2-plugin on the qcow2 image",
    "qemu-threads": "qemu-nbd -f qcow2 --cache=writeback --aio=threads on the same image",
    "qemu-uring": "qemu-nbd -f qcow2 --cache=writeback --aio=io_uring on the same image",
    "raw": "nbdkit file plugin on the equivalent raw image (the ceiling)",
    "base": "nbdkit + the base build of the plugin (PLUGIN_BASE) on the same "
            "image, same parameters; A and E swap places every other round",
    "qemu-native": "qemu-nbd -f qcow2 --cache=none --aio=native on the same image",
    "raw-direct": "qemu-nbd -f raw --cache=none --aio=native on the equivalent "
                  "raw image (the O_DIRECT ceiling)",
}
QEMU = ("qemu-threads", "qemu-uring", "qemu-native")
QEMU_SHORT = {"qemu-threads": "threads", "qemu-uring": "io_uring",
              "qemu-native": "native"}
RAW = ("raw", "raw-direct")
# Goals of issue 8, per workload: (min plugin/best-qemu, min plugin/raw).
RAW_GOAL = {"randread4k": 0.95, "randwrite4k": 0.95, "seqread1m": 0.95}
# Goals of issue 17 (--disk, cache=none): plugin/best qemu-nbd >= 1.0 on
# reads and overwrites, >= 1.3 on allocating and flush-heavy writes;
# plugin/raw O_DIRECT >= 0.9 on reads and overwrites.
DISK_RAW_GOAL = {"randread4k": 0.9, "randwrite4k": 0.9, "seqread1m": 0.9,
                 "mc-randread4k": 0.9, "mc-randwrite4k": 0.9}


def qemu_goal(wl, write, disk):
    if not disk:
        return 1.5 if write == "1" else 1.0
    return 1.3 if wl.startswith("alloc-") or "fsync" in wl else 1.0


def median(xs):
    return statistics.median(xs) if xs else None


def read_tsv(path):
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


class Run:
    def __init__(self, f):
        (self.wl, self.srv, rnd, self.st, iops, bw, ios, secs, ticks,
         rss, cli_ms, self.check) = f[:12]
        self.round = int(rnd)
        self.ok = self.st == "ok"
        self.iops = float(iops)
        self.bw = float(bw)
        self.ios = int(float(ios))
        self.secs = float(secs)
        self.ticks = int(ticks)
        self.rss = int(rss)
        self.cli_ms = float(cli_ms)
        # Host steal % over the run (later runs.tsv files only).
        st = f[12] if len(f) > 12 else "-"
        self.steal = float(st) if st not in ("", "-") else None
        # Growth of the image's bytes in the page cache over the run
        # (--disk), may be negative.
        pc = f[13] if len(f) > 13 else "-"
        self.pcache = int(pc) if pc not in ("", "-") else None

    def value(self, unit):
        return self.iops if unit == "iops" else self.bw / 1e6

    def cpu_us(self):
        if self.ios <= 0:
            return None
        return self.ticks / CLK_TCK * 1e6 / self.ios

    def cli_us(self):
        if self.ios <= 0:
            return None
        return self.cli_ms * 1e3 / self.ios


def fmt_val(v, unit):
    if v is None:
        return "-"
    if unit == "iops":
        return "%.1fk" % (v / 1000) if v >= 1000 else "%.0f" % v
    return "%.0f" % v


def fmt_range(xs, fmt):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = fmt(median(xs))
    if len(xs) == 1:
        return m
    return "%s (%s-%s)" % (m, fmt(min(xs)), fmt(max(xs)))


def f2(x):
    return "inf" if x == float("inf") else "%.2f" % x


def f1(x):
    return "%.1f" % x


def per_round(by, wl, a, b, fn):
    """Per-round ratios fn(run of a) / fn(run of b) over the rounds
    where both servers ran fine.  A b that did no I/O at all in the
    window gives an infinite ratio (shown as "inf")."""
    ra = {r.round: fn(r) for r in by.get((wl, a), []) if r.ok}
    rb = {r.round: fn(r) for r in by.get((wl, b), []) if r.ok}
    out = []
    for k in ra:
        if k not in rb or ra[k] is None or rb[k] is None:
            continue
        if rb[k] > 0:
            out.append(ra[k] / rb[k])
        elif ra[k] > 0:
            out.append(float("inf"))
    return out


def before_after(p, wls, by):
    p("## Before/after: plugin / base (medians of per-round ratios, "
      "min-max in brackets)")
    p()
    p("The plugin (A) against the base build (E), on the same image with "
      "the same parameters.  Throughput ratio > 1: this build is faster.  "
      "CPU ratio < 1: it spends less server CPU per I/O.  Both are paired "
      "per round like the ratios above; a wide min-max says the machine was "
      "noisy (a copy of the same build as base shows how noisy).")
    p()
    p("| workload | unit | plugin | base | plugin / base "
      "| CPU/IO plugin / base | RSS plugin / base |")
    p("|---|---|---|---|---|---|---|")
    for wl, unit, write, cap, desc in (w[:5] for w in wls):
        unit_s = "IOPS" if unit == "iops" else "MB/s"

        def med(s):
            return median([r.value(unit) for r in by.get((wl, s), []) if r.ok])

        thr = per_round(by, wl, "plugin", "base", lambda r: r.value(unit))
        cpu = per_round(by, wl, "plugin", "base", lambda r: r.cpu_us())
        rss = per_round(by, wl, "plugin", "base", lambda r: r.rss)
        p("| %s | %s | %s | %s | %s | %s | %s |" % (
            wl, unit_s, fmt_val(med("plugin"), unit), fmt_val(med("base"), unit),
            fmt_range(thr, f2), fmt_range(cpu, f2), fmt_range(rss, f2)))
    p()


def main(out):
    meta = dict((r[0], r[1]) for r in read_tsv(os.path.join(out, "meta.tsv")) if len(r) >= 2)
    wls = [r for r in read_tsv(os.path.join(out, "workloads.tsv"))]
    runs = [Run(r) for r in read_tsv(os.path.join(out, "runs.tsv"))]
    servers = meta.get("servers", "").split()
    disk = meta.get("mode") == "disk"
    raw_srv = next((s for s in servers if s in RAW), None)
    raw_goal = DISK_RAW_GOAL if disk else RAW_GOAL
    if meta.get("qemu_cache", "writeback") != "writeback":
        for s in ("qemu-threads", "qemu-uring"):
            SERVER_DESC[s] = SERVER_DESC[s].replace(
                "--cache=writeback", "--cache=" + meta["qemu_cache"])

    by = {}
    for r in runs:
        by.setdefault((r.wl, r.srv), []).append(r)

    p = print
    p("# nbdkit-qcow2 benchmark: plugin vs qemu-nbd vs raw file")
    p()
    if disk:
        p("**Disk mode** (`--disk`): images on a disk-backed file system, "
          "every server with the page cache out of the way (plugin "
          "parameters below, qemu-nbd --cache=none).")
        p()
    if meta.get("smoke") == "1":
        p("**Smoke run** (tiny images, 1 s runs): checks that the harness works; "
          "the numbers mean nothing.")
        p()
    p("- date: %s, commit %s" % (meta.get("date", "?"), meta.get("commit", "?")))
    p("- host: %s" % meta.get("host", "?"))
    p("- %s" % meta.get("versions", "?"))
    p("- images: %s; %s" % (meta.get("bench_dir", "?"), meta.get("sizes", "?")))
    order = "A B C D in each round"
    if disk or "base" in servers:
        order = (" ".join(SERVER_LABEL[s][0] for s in servers) +
                 " in each round" +
                 (" (A and E swap places every other round)" if "base" in servers else ""))
    p("- %s rounds x %s s measured (+%s s warm-up) per server and workload, "
      "servers alternating %s; whole run %s s"
      % (meta.get("rounds"), meta.get("runtime"), meta.get("ramp"), order,
         meta.get("elapsed", "?")))
    p("- load average (1, 5, 15 min) at start: %s, at end: %s (2 cores: "
      "anything else running skews the numbers)"
      % (meta.get("load_start", "?"), meta.get("load_end", "?")))
    p("- qemu-nbd --aio=io_uring: %s" % meta.get("uring", "?"))
    p("- plugin: %s; parameters: %s" % (meta.get("plugin", "?"),
                                         meta.get("plugin_args", "(defaults)")))
    if "base" in servers:
        p("- base plugin: %s; same parameters" % meta.get("plugin_base", "?"))
    p("- allocating runs stop after %s s or when the image has grown by about "
      "%.1f GiB, whichever comes first (fio io_size, same for all servers)"
      % (meta.get("runtime"), int(meta.get("alloc_budget", "0")) / 2**30))
    p("- qemu-img bench: %s requests of 4 KiB, QD32, stride %s bytes "
      "(no warm-up)" % (meta.get("qb_count"), meta.get("qb_step")))
    p()
    p("Servers:")
    p()
    for s in servers:
        p("- %s: %s" % (SERVER_LABEL[s], SERVER_DESC[s]))
    p()

    # ---- summary: ratios -------------------------------------------------
    p("## Ratios (medians of per-round ratios, min-max in brackets)")
    p()
    if disk:
        p("Throughput ratio > 1: the plugin is faster.  CPU ratio < 1: the "
          "plugin spends less server CPU per I/O.  Goals (issue 17, cache=none "
          "on a disk): plugin/best qemu-nbd >= 1.0 on reads and overwrites and "
          ">= 1.3 on allocating and flush-heavy writes; plugin/raw O_DIRECT "
          ">= 0.9 on reads and overwrites; CPU/I/O <= best qemu-nbd's.")
    else:
        p("Throughput ratio > 1: the plugin is faster.  CPU ratio < 1: the plugin "
          "spends less server CPU per I/O.  Goals (issue 8): plugin/best qemu-nbd "
          ">= 1.0 on reads and >= 1.5 on writes; plugin/raw >= 0.95 on "
          "randread4k, randwrite4k, seqread1m; CPU/I/O <= best qemu-nbd's.")
    p()
    p("| workload | unit | plugin | best qemu-nbd | raw | plugin / best qemu-nbd "
      "| plugin / raw | CPU/IO plugin / best qemu-nbd | goals |")
    p("|---|---|---|---|---|---|---|---|---|")
    for wl, unit, write, cap, desc in (w[:5] for w in wls):
        unit_s = "IOPS" if unit == "iops" else "MB/s"

        def okruns(s):
            return [r for r in by.get((wl, s), []) if r.ok]

        def med(s):
            return median([r.value(unit) for r in okruns(s)])

        def medcpu(s):
            return median([r.cpu_us() for r in okruns(s) if r.cpu_us() is not None])

        qs = [s for s in QEMU if s in servers and okruns(s)]
        best = max(qs, key=med) if qs else None

        def vs(other):
            if not other:
                return []
            return per_round(by, wl, "plugin", other, lambda r: r.value(unit))

        rq = vs(best)
        rr = vs(raw_srv)
        cpu_p = medcpu("plugin")
        cpu_q = [medcpu(s) for s in qs if medcpu(s) is not None]
        cpu_ratio = (cpu_p / min(cpu_q)) if cpu_p is not None and cpu_q and min(cpu_q) > 0 else None

        goals = []
        need = qemu_goal(wl, write, disk)
        if rq:
            goals.append("qemu %s" % ("met" if median(rq) >= need else "SHORT (>= %.1f)" % need))
        if wl in raw_goal and rr:
            goals.append("raw %s" % ("met" if median(rr) >= raw_goal[wl]
                                     else "SHORT (>= %.2f)" % raw_goal[wl]))
        if cpu_ratio is not None:
            goals.append("cpu %s" % ("met" if cpu_ratio <= 1.0 else "SHORT"))
        bestname = "-"
        if best:
            bestname = "%s (%s)" % (fmt_val(med(best), unit), QEMU_SHORT[best])
        p("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
            wl, unit_s, fmt_val(med("plugin"), unit), bestname,
            fmt_val(med(raw_srv), unit) if raw_srv else "-",
            fmt_range(rq, f2), fmt_range(rr, f2),
            f2(cpu_ratio) if cpu_ratio is not None else "-",
            ", ".join(goals) or "-"))
    p()

    # ---- before/after ------------------------------------------------------
    if "base" in servers:
        before_after(p, wls, by)

    # ---- per server --------------------------------------------------------
    p("## Per server (median, min-max over rounds)")
    p()
    p("Host steal: the share of the machine's CPU time the hypervisor took "
      "during the measured run (/proc/stat); a run with much steal measured "
      "the host, not the server.")
    p()
    has_pc = any(r.pcache is not None for rs in by.values() for r in rs)
    if has_pc:
        p("Page cache growth: how much more of the image file was in the "
          "host's page cache at the end of the run than at the server's "
          "start (fincore); with the page cache out of the way it stays "
          "near 0 however much was written.")
        p()
    p("| workload | server | throughput | server CPU us/IO | client CPU us/IO "
      "| peak RSS MiB | host steal % | qemu-img check |"
      + (" page cache growth MiB |" if has_pc else ""))
    p("|---|---|---|---|---|---|---|---|" + ("---|" if has_pc else ""))
    for wl, unit, write, cap, desc in (w[:5] for w in wls):
        unit_s = "IOPS" if unit == "iops" else "MB/s"
        for s in servers:
            rs = by.get((wl, s), [])
            ok = [r for r in rs if r.ok]
            nfail = len(rs) - len(ok)
            thr = fmt_range([r.value(unit) for r in ok], lambda v: fmt_val(v, unit))
            if nfail:
                thr += " **%d FAILED**" % nfail
            cpu = fmt_range([r.cpu_us() for r in ok], f1)
            cli = fmt_range([r.cli_us() for r in ok], f1)
            rss = fmt_range([r.rss / 1024 for r in ok], f1)
            steal = fmt_range([r.steal for r in ok if r.steal is not None], f1)
            checks = {}
            for r in rs:
                if r.check != "-":
                    checks[r.check] = checks.get(r.check, 0) + 1
            chk = ", ".join("%s x%d" % kv for kv in sorted(checks.items())) or "-"
            line = "| %s | %s | %s %s | %s | %s | %s | %s | %s |" % (
                wl, SERVER_LABEL[s], thr, unit_s, cpu, cli, rss, steal, chk)
            if has_pc:
                line += " %s |" % fmt_range(
                    [r.pcache / 2**20 for r in ok if r.pcache is not None], f1)
            p(line)
    p()

    # ---- workloads ---------------------------------------------------------
    p("## Workloads")
    p()
    for wl, unit, write, cap, desc in (w[:5] for w in wls):
        extra = ""
        if cap != "-":
            extra = " (fio io_size cap %d MiB)" % (int(cap) >> 20)
        p("- %s: %s%s" % (wl, desc, extra))
    p()

    # ---- checks ------------------------------------------------------------
    checked = [r for r in runs if r.check != "-"]
    bad = [r for r in checked if r.check != "ok"]
    fails = [r for r in runs if not r.ok]
    p("## qemu-img check")
    p()
    p("%d qcow2 images written and checked after the server exited: %d clean, "
      "%d with leaks only, %d corrupt or unreadable." % (
          len(checked), len([r for r in checked if r.check == "ok"]),
          len([r for r in checked if r.check == "leaks"]),
          len([r for r in checked if r.check not in ("ok", "leaks")])))
    for r in bad:
        p("- %s %s round %d: %s" % (r.wl, r.srv, r.round, r.check))
    p()
    p("Runs: %d, failed: %d." % (len(runs), len(fails)))
    for r in fails:
        p("- FAILED: %s %s round %d (logs in %s)" % (r.wl, r.srv, r.round,
                                                     meta.get("out_dir", "?")))
    p()

    # ---- profiles ----------------------------------------------------------
    profs = sorted(f for f in os.listdir(out) if f.endswith(".top25.txt"))
    if profs:
        p("## Profiles of the plugin server (perf record -g, self time, top 25)")
        p()
        for f in profs:
            wl = f[len("perf-"):-len(".top25.txt")]
            p("### %s" % wl)
            p()
            p("```")
            dso = os.path.join(out, "perf-%s.dso.txt" % wl)
            if os.path.exists(dso):
                with open(dso) as fh:
                    sys.stdout.write(fh.read())
                p()
            with open(os.path.join(out, f)) as fh:
                sys.stdout.write(fh.read())
            p("```")
            p()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.stderr.write("usage: report.py OUT_DIR\n")
        sys.exit(2)
    main(sys.argv[1])

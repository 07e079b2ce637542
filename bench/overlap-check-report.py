#!/usr/bin/env python3
# nbdkit-qcow2: the report of bench/overlap-check-bench.sh (issue 4).
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   overlap-check-report.py OUT_DIR     (reads meta.tsv, runs.tsv, mem.tsv)
#
# runs.tsv, one line per run: phase (fill|rand), virtual size (bytes),
# server (all|none|raw|qemu), round, status (ok|timeout|fail), fio
# runtime (s), bytes written, IOPS, I/Os, server CPU ticks (utime +
# stime), server VmHWM (KiB), client wall time (s), time to stop the
# server (s), qemu-img check (ok|leaks|corrupt|error(N)|- for raw), time
# of the check (s), server utime ticks, server stime ticks.
#
# mem.tsv, one line per filled image opened once more with nbdkit -v:
# size, plugin|qemu (who filled it), run tag, "overlap map built" bytes,
# "overlap map at close" bytes, runs, windows ("-" when not printed).
#
# all/none ratios are computed per round (the runs of a round are back
# to back, so slow drifts of the machine cancel out) and summarised as
# median (min-max).

import os
import statistics
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30

ALL_NONE_GOAL = 0.01     # all vs none: under 1 % apart
QEMU_GOAL = 10.0         # fill at 4 GiB at least 10x faster than qemu-nbd
GROWTH_GOAL = 4.5        # t(4 GiB) <= 4.5 t(1 GiB)


def median(xs):
    return statistics.median(xs) if xs else None


def read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def size_label(b):
    if b % GIB == 0:
        return "%d GiB" % (b // GIB)
    return "%d MiB" % (b >> 20)


def fmt_bytes(b):
    if b is None:
        return "-"
    if b >= 10 << 20:
        return "%.1f MiB" % (b / (1 << 20))
    if b >= 10 << 10:
        return "%.0f KiB" % (b / 1024)
    return "%d B" % b


def fmt_s(x):
    if x is None:
        return "-"
    if x >= 100:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x


def fmt_r(x):
    return "%.3f" % x


def fmt_spread(xs, f=fmt_s):
    """median (min-max), or the value alone when there is one."""
    if not xs:
        return "-"
    if len(xs) == 1 or min(xs) == max(xs):
        return f(xs[0])
    return "%s (%s-%s)" % (f(median(xs)), f(min(xs)), f(max(xs)))


def fmt_ratio(x):
    if x is None:
        return "-"
    if x >= 100:
        return "%.0f" % x
    if x >= 10:
        return "%.1f" % x
    return "%.2f" % x


def pct(r):
    return "%+.1f%%" % ((r - 1) * 100)


def spread_pct(xs):
    """(max - min) / median, or None for fewer than 2 values."""
    if len(xs) < 2:
        return None
    return (max(xs) - min(xs)) / median(xs)


class Run:
    def __init__(self, f):
        f = f + ["0"] * (17 - len(f))
        (self.phase, size, self.srv, rnd, self.st, secs, nbytes, iops, ios,
         ticks, rss, wall, stop, self.check, check_secs, uticks,
         sticks) = f[:17]
        self.size = int(size)
        self.round = int(rnd)
        self.secs = float(secs)
        self.bytes = int(nbytes)
        self.iops = float(iops)
        self.ios = int(ios)
        self.ticks = int(ticks)
        self.rss = int(rss)
        self.wall = float(wall)
        self.stop = float(stop)
        self.check_secs = float(check_secs)
        self.user = int(uticks) / CLK_TCK
        self.sys = int(sticks) / CLK_TCK

    @property
    def ok(self):
        return self.st == "ok"

    def cpu_s(self):
        return self.ticks / CLK_TCK

    def cpu_us_per_io(self):
        return self.cpu_s() * 1e6 / self.ios if self.ios > 0 else None

    def done(self):
        return self.bytes / self.size if self.size else 0


class Report:
    def __init__(self, out):
        self.meta = dict((f[0], f[1]) for f in
                         read_tsv(os.path.join(out, "meta.tsv"))
                         if len(f) >= 2)
        self.runs = [Run(f) for f in read_tsv(os.path.join(out, "runs.tsv"))]
        self.mems = read_tsv(os.path.join(out, "mem.tsv"))
        self.sizes = [int(x) for x in self.meta.get("sizes", "").split()]
        self.rand_size = int(self.meta.get("rand_size", "0"))
        self.qemu_timeout = int(self.meta.get("qemu_timeout", "0"))
        self.goals = []           # (goal, measured, verdict)

    def sel(self, phase, size, srv, st=None):
        return [r for r in self.runs if r.phase == phase and r.size == size
                and r.srv == srv and (st is None or r.st == st)]

    def paired(self, phase, size, a, b, key):
        """Per-round ratios key(a) / key(b), rounds where both are ok."""
        by = {}
        for r in self.runs:
            if r.phase == phase and r.size == size and r.ok:
                by.setdefault(r.round, {})[r.srv] = r
        out = []
        for rnd in sorted(by):
            if a in by[rnd] and b in by[rnd]:
                ka, kb = key(by[rnd][a]), key(by[rnd][b])
                if ka is not None and kb:
                    out.append(ka / kb)
        return out

    def all_none_goal(self, what, rat, xa, xb, unit):
        m = median(rat)
        noise = [x for x in (spread_pct(xa), spread_pct(xb)) if x is not None]
        verdict = "met" if abs(m - 1) < ALL_NONE_GOAL else "SHORT"
        if noise:
            note = "; run-to-run spread up to %.1f%%" % (max(noise) * 100)
            if max(noise) >= ALL_NONE_GOAL:
                note += ", wider than the goal"
                verdict = "not conclusive (median: %s)" % verdict
        else:
            note = "; one round"
            verdict = "not conclusive (median: %s)" % verdict
        self.goals.append((
            "%s: all vs none under 1%% apart" % what,
            "%s all/none %.3f (%s), per-round min-max %.3f-%.3f%s"
            % (unit, m, pct(m), min(rat), max(rat), note), verdict))

    # ---- header ----------------------------------------------------------

    def header(self):
        m = self.meta
        print("# Overlap checker benchmark (issue 4)")
        print()
        print("- date: %s, commit %s" % (m.get("date"), m.get("commit")))
        print("- host: %s" % m.get("host"))
        print("- versions: %s" % m.get("versions"))
        print("- plugin: %s" % m.get("plugin"))
        print("- images in %s" % m.get("bench_dir"))
        print("- rounds: %s (plugin), %s (qemu-nbd); qemu-nbd fill timeout "
              "%s s; random writes %s s after %s s warm-up%s"
              % (m.get("rounds"), m.get("qemu_rounds"), self.qemu_timeout,
                 m.get("runtime"), m.get("ramp"),
                 "; --quick" if m.get("quick") == "1" else ""))
        print("- load average (1, 5, 15 min): %s at start, %s at end; "
              "%s s in all" % (m.get("load_start"), m.get("load_end", "?"),
                               m.get("elapsed", "?")))
        print()

    # ---- fill ------------------------------------------------------------

    def fill(self):
        print("## Sequential fill: 1 MiB writes, QD8, the whole disk, "
              "empty image, 512-byte clusters")
        print()
        print("Seconds of fio's runtime for the fill, median (min-max) over "
              "the rounds.  all/none is computed per round.  Server CPU is "
              "utime+stime from ready to the end of the fill (median).  "
              "raw: nbdkit's file plugin filling a raw file on the same "
              "file system, the floor.")
        print()
        print("| size | plugin all s | plugin none s | all/none per round "
              "| server CPU s all / none | raw file s | qemu-nbd s "
              "| qemu-nbd / plugin all | qemu-img check |")
        print("|---|---|---|---|---|---|---|---|---|")
        self.fill_med = {}
        self.qemu_ratio = {}
        for size in self.sizes:
            a = self.sel("fill", size, "all", "ok")
            n = self.sel("fill", size, "none", "ok")
            w = self.sel("fill", size, "raw", "ok")
            ta = [r.secs for r in a]
            tn = [r.secs for r in n]
            rat = self.paired("fill", size, "all", "none", lambda r: r.secs)
            self.fill_med[size] = median(ta)
            q = self.sel("fill", size, "qemu")
            qtxt, qrtxt = "-", "-"
            qok = [r.secs for r in q if r.ok]
            qto = [r for r in q if r.st == "timeout"]
            if qok:
                qtxt = fmt_spread(qok)
                if ta:
                    self.qemu_ratio[size] = (median(qok) / median(ta), False)
                    qrtxt = fmt_ratio(self.qemu_ratio[size][0])
            elif qto:
                r = qto[0]
                est = r.secs / r.done() if r.done() > 0 else None
                qtxt = "> %.0f (%.1f%% done%s)" % (
                    r.secs, r.done() * 100,
                    "; ~%.0f at that rate" % est if est else "")
                if ta:
                    lb = r.secs / median(ta)
                    self.qemu_ratio[size] = (lb, True)
                    qrtxt = "> %s" % fmt_ratio(lb)
                    if est:
                        qrtxt += " (~%s)" % fmt_ratio(est / median(ta))
            elif q:
                qtxt = "failed"
            checked = [r for r in self.runs if r.phase == "fill" and
                       r.size == size and r.check != "-"]
            clean = sum(1 for r in checked if r.check == "ok")
            ctxt = "%d of %d clean" % (clean, len(checked))
            if clean < len(checked):
                ctxt += " (" + ", ".join(r.srv + " " + r.check for r in checked
                                         if r.check != "ok") + ")"
            cpu = "%s / %s" % (fmt_s(median([r.cpu_s() for r in a])),
                               fmt_s(median([r.cpu_s() for r in n])))
            print("| %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                size_label(size), fmt_spread(ta), fmt_spread(tn),
                (fmt_spread(rat, fmt_r) + " = " + pct(median(rat)))
                if rat else "-",
                cpu, fmt_spread([r.secs for r in w]), qtxt, qrtxt, ctxt))
        print()
        print("Throughput, MB/s (10^6 bytes/s), medians, and the servers' "
              "CPU split user + sys (medians, s):")
        print()
        print("| size | all | none | raw | qemu-nbd | CPU all | CPU none "
              "| CPU raw | CPU qemu-nbd |")
        print("|---|---|---|---|---|---|---|---|---|")
        for size in self.sizes:
            cells = []
            for srv in ("all", "none", "raw", "qemu"):
                rs = [r for r in self.sel("fill", size, srv)
                      if r.st in ("ok", "timeout") and r.secs]
                cells.append(fmt_s(median([r.bytes / r.secs / 1e6
                                           for r in rs])))
            for srv in ("all", "none", "raw", "qemu"):
                rs = [r for r in self.sel("fill", size, srv)
                      if r.st in ("ok", "timeout")]
                cells.append("%s + %s" % (fmt_s(median([r.user for r in rs])),
                                          fmt_s(median([r.sys for r in rs])))
                             if rs else "-")
            print("| %s | %s |" % (size_label(size), " | ".join(cells)))
        print()

        # Goals.
        for size in self.sizes:
            rat = self.paired("fill", size, "all", "none", lambda r: r.secs)
            if rat:
                self.all_none_goal(
                    "fill %s" % size_label(size), rat,
                    [r.secs for r in self.sel("fill", size, "all", "ok")],
                    [r.secs for r in self.sel("fill", size, "none", "ok")],
                    "time")
        big = GIB * 4 if GIB * 4 in self.sizes else max(self.sizes)
        label = "fill %s at least 10x faster than qemu-nbd" % size_label(big)
        if big != GIB * 4:
            label += " (the issue's goal is at 4 GiB)"
        if big in self.qemu_ratio:
            v, lower = self.qemu_ratio[big]
            if lower:
                verdict = ("met" if v >= QEMU_GOAL else
                           "undecided (qemu-nbd stopped at %d s; raise "
                           "QEMU_TIMEOUT)" % self.qemu_timeout)
                self.goals.append((label, "qemu-nbd / plugin > %s (a lower "
                                   "bound: qemu-nbd did not finish)"
                                   % fmt_ratio(v), verdict))
            else:
                self.goals.append((label, "qemu-nbd / plugin %s"
                                   % fmt_ratio(v),
                                   "met" if v >= QEMU_GOAL else "SHORT"))
        else:
            self.goals.append((label, "no qemu-nbd run", "not measured"))
        lo, hi = min(self.sizes), max(self.sizes)
        if GIB in self.sizes and 4 * GIB in self.sizes:
            lo, hi = GIB, 4 * GIB
            limit = GROWTH_GOAL
            label = "plugin fill linear: t(4 GiB) <= 4.5 t(1 GiB)"
        else:
            limit = GROWTH_GOAL / 4 * hi / lo
            label = ("plugin fill linear: t(%s) <= %.2f t(%s) (the issue's "
                     "4.5 for 4x, scaled)" % (size_label(hi), limit,
                                              size_label(lo)))
        if hi > lo and self.fill_med.get(lo) and self.fill_med.get(hi):
            g = self.fill_med[hi] / self.fill_med[lo]
            extra = []
            for srv, name in (("none", "overlap-check=none"),
                              ("raw", "raw file (the floor)")):
                th = [r.secs for r in self.sel("fill", hi, srv, "ok")]
                tl = [r.secs for r in self.sel("fill", lo, srv, "ok")]
                if th and tl:
                    extra.append("%s %.2f" % (name, median(th) / median(tl)))
            ch = [r.cpu_s() for r in self.sel("fill", hi, "all", "ok")]
            cl = [r.cpu_s() for r in self.sel("fill", lo, "all", "ok")]
            if ch and cl and median(cl):
                extra.append("server CPU (all) %.2f"
                             % (median(ch) / median(cl)))
            self.goals.append((label, "t(%s)/t(%s) = %.2f (all, medians)%s"
                               % (size_label(hi), size_label(lo), g,
                                  "; " + ", ".join(extra) if extra else ""),
                               "met" if g <= limit else "SHORT"))

    # ---- memory ------------------------------------------------------------

    def memory(self):
        print("## The checker's memory")
        print()
        print("Each image the plugin filled, opened once more, untimed, with "
              "`nbdkit -v PLUGIN file=IMG overlap-check=all --run true`: "
              "\"overlap map built\" at open (the map of all the metadata "
              "of the filled image) and \"overlap map at close\" with its "
              "runs and windows, when the plugin prints it.  The 2014 "
              "estimate is 40 * size / 512^2 bytes.  VmHWM: peak RSS of the "
              "fill servers (the whole process, median).")
        print()
        print("| size | map after fill (built at open) | at close | runs "
              "| windows | 2014 estimate | map / estimate "
              "| VmHWM KiB all / none | map of qemu-nbd's image |")
        print("|---|---|---|---|---|---|---|---|---|")

        def col(size, src, i):
            return [int(m[i]) for m in self.mems
                    if int(m[0]) == size and m[1] == src and m[i] != "-"]

        def spread_b(xs):
            if not xs:
                return "-"
            if min(xs) == max(xs):
                return "%s (%d)" % (fmt_bytes(xs[0]), xs[0])
            return "%s (%d-%d)" % (fmt_bytes(median(xs)), min(xs), max(xs))

        for size in self.sizes:
            built, close = col(size, "plugin", 3), col(size, "plugin", 4)
            nruns, nwin = col(size, "plugin", 5), col(size, "plugin", 6)
            qb = col(size, "qemu", 3)
            est = 40 * size / 512 ** 2
            fig = median(close) if close else median(built)
            ra = [r.rss for r in self.sel("fill", size, "all", "ok")]
            rn = [r.rss for r in self.sel("fill", size, "none", "ok")]
            print("| %s | %s | %s | %s | %s | %s | %s | %s / %s | %s |" % (
                size_label(size), spread_b(built),
                spread_b(close) if close else "not printed",
                fmt_spread(nruns, lambda x: "%d" % x),
                fmt_spread(nwin, lambda x: "%d" % x),
                fmt_bytes(est), "%.2f" % (fig / est) if fig else "-",
                "%d" % median(ra) if ra else "-",
                "%d" % median(rn) if rn else "-",
                fmt_bytes(median(qb)) if qb else "-"))
        print()

    # ---- random writes -------------------------------------------------------

    def random(self):
        rs = self.rand_size
        print("## Random allocating writes: 4 KiB, QD32, empty %s image, "
              "512-byte clusters" % size_label(rs))
        print()
        print("Server CPU per I/O over the measured window, and its user "
              "part (the checker runs in user space; sys is mostly the "
              "page cache or tmpfs).")
        print()
        print("| server | IOPS | server CPU us/IO | user us/IO "
              "| peak RSS KiB | qemu-img check |")
        print("|---|---|---|---|---|---|")
        for srv, label in (("all", "plugin overlap-check=all"),
                           ("none", "plugin overlap-check=none"),
                           ("qemu", "qemu-nbd --aio=threads")):
            runs = self.sel("rand", rs, srv)
            if not runs:
                continue
            ok = [r for r in runs if r.ok]
            print("| %s | %s | %s | %s | %s | %s |" % (
                label, fmt_spread([r.iops for r in ok], lambda x: "%.0f" % x),
                fmt_spread([r.cpu_us_per_io() for r in ok
                            if r.cpu_us_per_io() is not None],
                           lambda x: "%.1f" % x),
                fmt_spread([r.user * 1e6 / r.ios for r in ok if r.ios > 0],
                           lambda x: "%.2f" % x),
                fmt_spread([r.rss for r in ok], lambda x: "%d" % x),
                ", ".join(r.check for r in runs)))
        print()
        rat = self.paired("rand", rs, "all", "none", lambda r: r.iops)
        crat = self.paired("rand", rs, "all", "none",
                           lambda r: r.cpu_us_per_io())
        ia = [r.iops for r in self.sel("rand", rs, "all", "ok")]
        ino = [r.iops for r in self.sel("rand", rs, "none", "ok")]
        iq = [r.iops for r in self.sel("rand", rs, "qemu", "ok")]
        urat = self.paired("rand", rs, "all", "none",
                           lambda r: r.user / r.ios if r.ios > 0 else None)
        if rat:
            print("- IOPS all/none per round: %s = %s; server CPU per I/O "
                  "all/none: %s; user CPU per I/O all/none: %s"
                  % (fmt_spread(rat, fmt_r), pct(median(rat)),
                     fmt_spread(crat, fmt_r), fmt_spread(urat, fmt_r)))
        if ia and iq:
            print("- IOPS plugin all / qemu-nbd: %s"
                  % fmt_ratio(median(ia) / median(iq)))
        print()
        if rat:
            self.all_none_goal("random 4 KiB writes", rat, ia, ino, "IOPS")

    # ---- goals and runs ------------------------------------------------------

    def summary(self):
        print("## Goals (issue 4)")
        print()
        print("| goal | measured | verdict |")
        print("|---|---|---|")
        for g in self.goals:
            print("| %s | %s | %s |" % g)
        checked = [r for r in self.runs if r.check != "-"]
        clean = sum(1 for r in checked if r.check == "ok")
        print("| every image clean in qemu-img check | %d of %d clean | %s |"
              % (clean, len(checked),
                 "met" if checked and clean == len(checked) else "FAILED"))
        print()
        print("## All runs")
        print()
        print("| phase | size | server | round | status | fio s | done "
              "| IOPS | server CPU s (user + sys) | VmHWM KiB | client wall s "
              "| stop s | check | check s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in self.runs:
            print("| %s | %s | %s | %d | %s | %.3f | %s | %s "
                  "| %.2f (%.2f + %.2f) | %d | %.3f | %.3f | %s | %.1f |" % (
                      r.phase, size_label(r.size), r.srv, r.round, r.st,
                      r.secs,
                      "%.1f%%" % (r.done() * 100) if r.phase == "fill"
                      else "-",
                      "%.0f" % r.iops if r.phase == "rand" else "-",
                      r.cpu_s(), r.user, r.sys, r.rss, r.wall, r.stop,
                      r.check, r.check_secs))


def main():
    rep = Report(sys.argv[1])
    rep.header()
    if rep.sizes:
        rep.fill()
        rep.memory()
    if rep.rand_size:
        rep.random()
    rep.summary()


if __name__ == "__main__":
    main()

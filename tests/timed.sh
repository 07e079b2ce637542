# nbdkit-qcow2: run a test and print how long it took.  -*- shell-script -*-
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# The LOG_COMPILER of every test (tests/Makefile.am): runs the test
# (ARGS... is the test and its interpreter, if any) and appends "elapsed: N s" to its log, so that the slowest tests
# of a run can be found from the logs (.ci/run prints the ten slowest),
# and "cpu: N s" (user + system time of the test and of every process
# that was waited for), which, unlike the elapsed time, hardly depends on what
# else the machine is doing.  The test's exit status is passed on
# unchanged (77 skip, 99 hard error).

start=$(date +%s)
r=0
"$@" || r=$?
echo "elapsed: $(( $(date +%s) - start )) s"
# Fields 16 and 17 of /proc/PID/stat are the user and system time of
# the waited-for children of PID, in clock ticks.
if [ -r /proc/$$/stat ]; then
    awk -v hz="$(getconf CLK_TCK 2>/dev/null || echo 100)" \
        '{ printf "cpu: %.1f s\n", ($16 + $17) / hz }' /proc/$$/stat
fi
exit $r

# nbdkit-qcow2: run a test and print how long it took.  -*- shell-script -*-
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
# The LOG_COMPILER of every test (tests/Makefile.am): runs the test
# (ARGS... is the test and its interpreter, if any) and appends
# "elapsed: N s" to its log, so that the slowest tests of a run can be
# found from the logs (.ci/run prints the ten slowest).  The test's
# exit status is passed on unchanged (77 skip, 99 hard error).

start=$(date +%s)
r=0
"$@" || r=$?
echo "elapsed: $(( $(date +%s) - start )) s"
exit $r

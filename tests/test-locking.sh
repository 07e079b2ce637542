#!/usr/bin/env bash
# nbdkit-qcow2: image locking interoperates with QEMU.
#
# QEMU's file driver holds shared open-file-description locks on bytes
# 100+i ("I use permission i") and 200+i ("I do not share permission
# i") of every image file it has open, i = 0 consistent read, 1 write,
# 2 write unchanged, 3 resize, and refuses to open a file whose bytes
# conflict with what it wants.  The plugin must take exactly what
# qemu-nbd takes in the same role (writable, or -r), so that it refuses
# QEMU and QEMU refuses it exactly as if it were another qemu-nbd.
#
# Three set-ups, each served writable and read-only, once by qemu-nbd
# and once by the plugin (read-only: qemu-nbd -r; the plugin
# readonly=true, with -r too; see (3) for -r alone):
#   chain:    disk.qcow2 -> base.qcow2 (qcow2 backing); over.qcow2 is an
#             overlay of disk.qcow2 that only the probes open
#   datafile: dat.qcow2 with the external data file dat.raw
#   rawback:  rb.qcow2 -> rb.raw (raw backing file)
# For each: (1) the lock bytes /proc/locks shows on every file must be
# the same under both servers, and equal the table below; (2) every
# probe (qemu-io, qemu-img on the image, its backing file, data file
# and overlay) must give the same result under both servers, and the
# result written in the table.
#
# (3) The other way round: with qemu-nbd serving disk.qcow2 writable or
# read-only, the plugin (writable or readonly=true) must start exactly
# when a second qemu-nbd in its role would, and when refused name the
# lock; with locking=off it always starts.  nbdkit -r without
# readonly=true cannot be seen by the plugin before a client connects,
# so it locks as a writer, and says readonly=true when refused.
#
# (4) Two plugin servers on one image behave as two qemu-nbd.
#
# QEMU 7.2's rules, pinned here: an image served writable refuses other
# writers ('Failed to get "write" lock') and also plain read-only opens,
# qemu-img info included ('Failed to get shared "write" lock'), and
# overlays that use it as a backing file; only force-share (-U) opens
# work.  An image served read-only can be opened read-only by anyone,
# but not for writing.  Backing files are locked like read-only images
# (qcow2) or only marked as in use (raw).  External data files can be
# read and written by others (qemu-nbd shares writes) but not resized.

source ./functions.sh
set -e
set -u

requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires nbdinfo --version
requires test -r /proc/locks

d=$tmpdir
cd "$d"

#----------------------------------------------------------------------
# Servers.  One at a time, on $sock, killed by PID at exit.

sock=$d/server.sock
pidfile=$d/server.pid
server_pid=

# kill_wait PID: kill a server and wait until it has gone (its locks
# go with it).  The daemons are children of init, which may leave them
# zombies for a while: a zombie has closed its files, so it counts as
# gone.  SIGTERM is repeated: qemu-nbd 7.2 can miss one that comes
# straight after it started.
kill_wait ()
{
  local i
  for (( i = 0; i < 100; i++ )); do
    grep -qs '^State:[[:space:]]*[^Z]' "/proc/$1/status" || return 0
    kill "$1" 2>/dev/null || :
    sleep 0.1
  done
  fail "process $1 did not exit"
}

stop_server ()
{
  [ -n "$server_pid" ] || return 0
  kill_wait "$server_pid"
  server_pid=
}
cleanup_fn stop_server

# start_server qemu|plugin RO IMG [PLUGIN-PARAMS...]: RO is "" or -r
# (for the plugin, -r readonly=true).
# Returns 1 (stderr in $d/start.err) if the server refused to start.
start_server ()
{
  local kind=$1 ro=$2 img=$3 r=0
  shift 3
  rm -f "$sock" "$pidfile"
  case "$kind" in
    qemu)
      qemu-nbd $ro -t -f qcow2 --socket="$sock" --pid-file="$pidfile" \
               --fork "$img" 2>"$d/start.err" || r=$? ;;
    plugin)
      nbdkit $ro -U "$sock" -P "$pidfile" "$PLUGIN" file="$img" \
             ${ro:+readonly=true} "$@" \
             2>"$d/start.err" || r=$? ;;
  esac
  [ $r -eq 0 ] || return 1
  wait_socket "$sock" "$pidfile" ||
    fail "$kind server did not start (no socket or no pid file)"
  server_pid=$(cat "$pidfile")
  nbdinfo --size "nbd+unix:///?socket=$sock" >/dev/null ||
    fail "$kind server on $img does not answer"
}

# lockbytes FILE: the bytes of FILE anyone holds an OFD lock on.
lockbytes ()
{
  local ino
  ino=$(stat -c %i "$1")
  awk -v ino="$ino" '
    $2 == "OFDLCK" {
      n = split($6, a, ":")
      if (a[n] == ino)
        for (b = $7; b <= $8; b++) print b
    }' /proc/locks | sort -n | uniq | tr '\n' ' ' | sed 's/ $//'
}

# classify FILE: what the error messages in FILE say: the lock that
# could not be got ("write", "shared write", "resize", ...) or
# "error: FIRST LINE".
classify ()
{
  local out
  out=$(cat "$1")
  if [[ $out =~ Failed\ to\ get\ (shared\ )?\"([a-z ]*)\"\ lock ]]; then
    echo "${BASH_REMATCH[1]}${BASH_REMATCH[2]}"
  else
    echo "error: $(head -n 1 <<< "$out")"
  fi
}

# probe CMD...: run a QEMU command; print "ok" or, if it fails, what
# classify says.
probe ()
{
  if "$@" </dev/null >"$d/probe.out" 2>&1; then
    echo ok
  else
    classify "$d/probe.out"
  fi
}

#----------------------------------------------------------------------
# Images.

qemu-img create -q -f qcow2 base.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 disk.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x22 512 4096' disk.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b disk.qcow2 -F qcow2 over.qcow2 64M
qemu-img create -q -f qcow2 -o data_file=dat.raw dat.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x33 0 64k' dat.qcow2 >/dev/null
head -c 1M /dev/zero > rb.raw
qemu-img create -q -f qcow2 -b rb.raw -F raw rb.qcow2 64M

#----------------------------------------------------------------------
# (1) and (2).  Each set-up: the served image, then lines of
#   locks FILE | bytes when writable | bytes when read-only
#   probe LABEL | result when writable | when read-only | COMMAND
# (COMMAND is eval'd.)  A failing probe changes nothing; a probe that
# should fail but succeeds makes the test fail anyway.

setup_chain="disk.qcow2
locks disk.qcow2 | 100 101 103 201 203 | 100 201 203
locks base.qcow2 | 100 201 203         | 100 201 203
locks over.qcow2 |                     |
probe qemu-io write image    | write        | write | qemu-io -f qcow2 -c 'write -P 0x44 0 512' disk.qcow2
probe qemu-io -r image       | shared write | ok    | qemu-io -f qcow2 -r -c 'read 0 512' disk.qcow2
probe qemu-img info image    | shared write | ok    | qemu-img info disk.qcow2
probe qemu-img info -U image | ok           | ok    | qemu-img info -U disk.qcow2
probe qemu-io -r -U image    | ok           | ok    | qemu-io -f qcow2 -r -U -c 'read 0 512' disk.qcow2
probe qemu-io -r overlay     | shared write | ok    | qemu-io -f qcow2 -r -c 'read 0 512' over.qcow2
probe qemu-io write backing  | write        | write | qemu-io -f qcow2 -c 'write -P 0x55 0 512' base.qcow2
probe qemu-io -r backing     | ok           | ok    | qemu-io -f qcow2 -r -c 'read 0 512' base.qcow2
probe qemu-img info backing  | ok           | ok    | qemu-img info base.qcow2"

setup_datafile="dat.qcow2
locks dat.qcow2 | 100 101 103 201 203 | 100 201 203
locks dat.raw   | 100 101 103 203     | 100 203
probe qemu-io write image        | write        | write  | qemu-io -f qcow2 -c 'write -P 0x44 0 512' dat.qcow2
probe qemu-img info image        | shared write | ok     | qemu-img info dat.qcow2
probe qemu-io write data file    | ok           | ok     | qemu-io -f raw -c 'write -P 0x33 0 512' dat.raw
probe qemu-img info data file    | ok           | ok     | qemu-img info -f raw dat.raw
probe qemu-img resize data file  | resize       | resize | qemu-img resize -f raw dat.raw 128M"

setup_rawback="rb.qcow2
locks rb.qcow2 | 100 101 103 201 203 | 100 201 203
locks rb.raw   | 100                 | 100
probe qemu-img info image       | shared write | ok | qemu-img info rb.qcow2
probe qemu-io write raw backing | ok           | ok | qemu-io -f raw -c 'write -P 0 0 512' rb.raw"

trim ()
{
  local s=$1
  s=${s#"${s%%[! ]*}"}
  echo "${s%"${s##*[! ]}"}"
}

# observe KIND RO SETUP: start KIND on the set-up's image in role RO,
# print one line per locks/probe line: "LABEL: RESULT".
observe ()
{
  local kind=$1 ro=$2 setup=$3
  local img line what label
  img=$(head -n 1 <<< "$setup")
  start_server "$kind" "$ro" "$img" ||
    fail "$kind ${ro:-rw} refused to serve $img: $(cat "$d/start.err")"
  while IFS='|' read -r what _ _ cmd; do
    what=$(trim "$what")
    case "$what" in
      locks\ *) echo "${what}: $(lockbytes "${what#locks }")" ;;
      probe\ *) echo "${what}: $(eval "probe $cmd")" ;;
    esac
  done <<< "$(tail -n +2 <<< "$setup")"
  stop_server
}

# expected RO SETUP: the results written in the set-up.
expected ()
{
  local ro=$1 setup=$2 what rw rdonly
  while IFS='|' read -r what rw rdonly _; do
    if [ -z "$ro" ]; then
      echo "$(trim "$what"): $(trim "$rw")"
    else
      echo "$(trim "$what"): $(trim "$rdonly")"
    fi
  done <<< "$(tail -n +2 <<< "$setup")"
}

for name in chain datafile rawback; do
  var=setup_$name
  setup=${!var}
  for ro in "" -r; do
    role=${ro:-rw}
    expected "$ro" "$setup" > "expected.$name.$role"
    observe qemu "$ro" "$setup" > "qemu.$name.$role"
    observe plugin "$ro" "$setup" > "plugin.$name.$role"
    if ! cmp -s "expected.$name.$role" "qemu.$name.$role"; then
      diff -u "expected.$name.$role" "qemu.$name.$role" >&2 || :
      fail "$name $role: qemu-nbd does not behave as this test expects"
    fi
    if ! cmp -s "qemu.$name.$role" "plugin.$name.$role"; then
      diff -u "qemu.$name.$role" "plugin.$name.$role" >&2 || :
      fail "$name $role: the plugin locks differently from qemu-nbd"
    fi
    echo "$name $role: plugin locks and conflicts like qemu-nbd"
    sed 's/^/  /' "plugin.$name.$role"
  done
done

#----------------------------------------------------------------------
# (3) The plugin against a running qemu-nbd.

# second ROLE: would a second qemu-nbd in ROLE start?  Prints ok or the
# lock, like probe.
second_qemu ()
{
  local ro=$1 r=0
  qemu-nbd $ro -f qcow2 --socket="$d/second.sock" --pid-file="$d/second.pid" \
           --fork disk.qcow2 2>"$d/second.err" || r=$?
  if [ $r -eq 0 ]; then
    kill_wait "$(cat "$d/second.pid")"
    echo ok
  else
    classify "$d/second.err"
  fi
}

# plugin_start RO [PARAMS...]: does the plugin start on disk.qcow2?
# (RO -r means -r readonly=true.)
plugin_start ()
{
  local ro=$1 r=0
  shift
  nbdkit $ro -U - "$PLUGIN" file="$d/disk.qcow2" ${ro:+readonly=true} "$@" \
         --run 'nbdinfo --size "$uri"' >/dev/null 2>"$d/plugin.err" || r=$?
  if [ $r -eq 0 ]; then
    echo ok
  else
    classify "$d/plugin.err"
  fi
}

# qemu role | plugin role | expected of a second qemu-nbd | expected of
# the plugin | lock byte named by the plugin.  The plugin takes its
# role's locks at start, as qemu-nbd does, so it is refused exactly
# when and as a second qemu-nbd is.
for row in "rw|rw|write|write|201" "rw|-r|shared write|shared write|101" \
           "-r|rw|write|write|201" "-r|-r|ok|ok|"; do
  IFS='|' read -r qro pro want pwant byte <<< "$row"
  [ "$qro" = rw ] && qro=
  [ "$pro" = rw ] && pro=
  start_server qemu "$qro" disk.qcow2 ||
    fail "qemu-nbd did not start: $(cat "$d/start.err")"
  q=$(second_qemu "$pro")
  p=$(plugin_start "$pro")
  label="qemu-nbd ${qro:-rw}, plugin ${pro:-rw}"
  [ "$q" = "$want" ] ||
    fail "$label: a second qemu-nbd gave '$q', this test expects '$want'"
  [ "$p" = "$pwant" ] ||
    fail "$label: the plugin gave '$p', expected '$pwant': $(cat "$d/plugin.err")"
  if [ -n "$byte" ]; then
    grep -q "lock byte $byte is held" "$d/plugin.err" ||
      fail "$label: the plugin's message does not name byte $byte: $(cat "$d/plugin.err")"
  fi
  p=$(plugin_start "$pro" locking=off)
  [ "$p" = ok ] || fail "$label: locking=off did not start: $(cat "$d/plugin.err")"
  stop_server
  echo "$label: qemu-nbd $want, plugin $pwant; locking=off starts"
done
sed 's/^/  /' "$d/plugin.err"

# nbdkit -r alone: the writer's locks (nbdkit 1.32 tells the plugin
# about -r only when a client connects), so a qemu-nbd reader refuses
# it, and the message says what to use instead.
start_server qemu -r disk.qcow2 || fail "qemu-nbd -r did not start"
r=0
nbdkit -r -U - "$PLUGIN" file="$d/disk.qcow2" --run 'nbdinfo --size "$uri"' \
       >/dev/null 2>"$d/plugin.err" || r=$?
[ $r -ne 0 ] && [ "$(classify "$d/plugin.err")" = write ] &&
  grep -q 'readonly=true' "$d/plugin.err" ||
  fail "nbdkit -r next to qemu-nbd -r: $(cat "$d/plugin.err")"
stop_server
echo "nbdkit -r without readonly=true: locks as a writer, says readonly=true"
sed 's/^/  /' "$d/plugin.err"

# An overlay of an image qemu-nbd serves writable is refused, as
# qemu-io refuses it above; of one it serves read-only, allowed.
start_server qemu "" disk.qcow2 || fail "qemu-nbd did not start"
r=0
nbdkit -U - "$PLUGIN" file="$d/over.qcow2" --run true 2>"$d/plugin.err" || r=$?
[ $r -ne 0 ] && grep -q 'disk.qcow2: Failed to get shared "write" lock' "$d/plugin.err" ||
  fail "overlay of a writable qemu-nbd image: $(cat "$d/plugin.err")"
stop_server
start_server qemu -r disk.qcow2 || fail "qemu-nbd -r did not start"
nbdkit -U - "$PLUGIN" file="$d/over.qcow2" --run 'nbdinfo --size "$uri"' >/dev/null ||
  fail "overlay of a read-only qemu-nbd image was refused"
stop_server
echo "overlay of a served image: as qemu-io"

#----------------------------------------------------------------------
# (4) Two plugin servers on one image, as two qemu-nbd: server A,
# writable, holds the writer's locks from the start, before any client
# connects, so a second writable server B is refused at start with a
# message that names the lock and says the image is in use, and A goes
# on accepting writes.  (The bug: A and B both started as readers, and
# then neither could take the writer's locks for a writable client.)

qemu-img create -q -f qcow2 two.qcow2 64M
sock_b=$d/b.sock
pidfile_b=$d/b.pid
pid_b=
stop_b ()
{
  [ -n "$pid_b" ] || return 0
  kill_wait "$pid_b"
  pid_b=
}
cleanup_fn stop_b

# wait_pidfile FILE: the PID a daemon wrote to FILE.
wait_pidfile ()
{
  local i
  for (( i = 0; i < 100; i++ )); do
    [ -s "$1" ] && break
    sleep 0.1
  done
  [ -s "$1" ] || fail "no pid file $1"
  cat "$1"
}

rm -f "$sock" "$pidfile"
nbdkit -U "$sock" -P "$pidfile" "$PLUGIN" file="$d/two.qcow2" 2>"$d/a.err" ||
  fail "server A did not start: $(cat "$d/a.err")"
server_pid=$(wait_pidfile "$pidfile")
problems=
a_locks=$(lockbytes two.qcow2)
[ "$a_locks" = "100 101 103 201 203" ] ||
  problems+="server A holds lock bytes '$a_locks' before any client, not the writer's; "

r=0
nbdkit -U "$sock_b" -P "$pidfile_b" "$PLUGIN" file="$d/two.qcow2" \
       2>"$d/b.err" || r=$?
if [ $r -eq 0 ]; then
  pid_b=$(wait_pidfile "$pidfile_b")
  problems+="server B started on an image server A serves writable; "
else
  [ "$(classify "$d/b.err")" = write ] &&
    grep -q 'lock byte 201 is held' "$d/b.err" &&
    grep -q 'in use' "$d/b.err" ||
    problems+="server B was refused without the lock message: $(cat "$d/b.err"); "
fi

# A must still take a writable connection and writes.
if ! nbdsh -u "nbd+unix:///?socket=$sock" -c '
assert not h.is_read_only()
h.pwrite(b"\x77" * 65536, 1048576)
h.flush()
assert h.pread(65536, 1048576) == b"\x77" * 65536
' >"$d/a.out" 2>&1; then
  problems+="server A no longer accepts writes: $(tail -n 1 "$d/a.out"); "
fi
stop_b
stop_server
[ -z "$problems" ] || fail "two servers on one image: $problems"
qemu-img check -q two.qcow2 || fail "two.qcow2: qemu-img check failed"
qemu-io -f qcow2 -r -c 'read -P 0x77 1M 64k' two.qcow2 >/dev/null ||
  fail "two.qcow2: server A's write is not in the image"
echo "two servers on one image: the second is refused, the first writes"
sed 's/^/  /' "$d/b.err"

# snapshot= (without -r) serves read-only, so it locks as a reader from
# the start: QEMU's readers and a readonly=true server share the image.
qemu-img snapshot -c snap two.qcow2
start_server plugin "" two.qcow2 snapshot=snap ||
  fail "snapshot=snap did not start: $(cat "$d/start.err")"
[ "$(lockbytes two.qcow2)" = "100 201 203" ] ||
  fail "snapshot=snap locks $(lockbytes two.qcow2), not a reader's"
qemu-img info two.qcow2 >/dev/null || fail "snapshot=snap refused qemu-img info"
nbdkit -U - "$PLUGIN" file="$d/two.qcow2" readonly=true \
       --run 'nbdinfo --size "$uri"' >/dev/null ||
  fail "snapshot=snap refused a readonly=true server"
stop_server
echo "snapshot=: locks as a reader, shares the image with readers"

echo "$0: ok"

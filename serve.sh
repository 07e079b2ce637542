#!/bin/bash
# nbdkit-qcow2: serve a qcow2 image with the plugin from this build tree.
# Copyright (C) 2026 the nbdkit-qcow2 authors.  BSD-3-Clause, see LICENSE.
#
#   ./serve.sh [IMAGE] [NBDKIT ARGS...]
#
# Without IMAGE, serves demo.qcow2 in the current directory (created,
# 64 MiB with some data, if it does not exist).  Extra arguments go to
# nbdkit, e.g. `./serve.sh disk.qcow2 -r l2-cache-size=4M`.  Serves in
# the foreground on a Unix socket until interrupted.

set -e

# nbdsh and friends want /usr/bin/python3 (with the nbd module).
export PATH=/usr/bin:/usr/sbin:$PATH

top=$(cd "$(dirname "$0")" && pwd)
plugin=$top/plugin/.libs/nbdkit-qcow2-plugin.so
sock=/tmp/nbdkit-qcow2.sock
uri="nbd+unix:///?socket=$sock"

if [ ! -f "$plugin" ]; then
    echo "$0: $plugin not found: build first (./configure && make)" >&2
    exit 1
fi

if [ $# -gt 0 ] && [[ $1 != -* ]] && [[ $1 != *=* ]]; then
    img=$1
    shift
else
    img=demo.qcow2
    if [ ! -f "$img" ]; then
        echo "creating $img (64 MiB qcow2 with some data)"
        qemu-img create -q -f qcow2 "$img" 64M
        qemu-io -f qcow2 \
            -c 'write -P 0x55 0 1M' \
            -c 'write -c -P 0x33 8M 64k' \
            -c 'write -z 16M 1M' \
            -c 'write -P 0xaa 32M 4M' \
            "$img" >/dev/null
    fi
fi

if [ ! -f "$img" ]; then
    echo "$0: $img: no such file" >&2
    exit 1
fi

cat <<EOT
Serving $img on $sock (Ctrl-C to stop).  Connect with:

    nbdinfo '$uri'
    nbdsh -u '$uri'
    qemu-img info '$uri'

EOT

rm -f "$sock"
exec nbdkit -f -U "$sock" "$plugin" file="$img" "$@"

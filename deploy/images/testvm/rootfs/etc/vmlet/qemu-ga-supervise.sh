#!/bin/sh
# Keep qemu-ga running on the port $1 (started by boot.d/50-qemu-ga). Each exit is a console line.
echo $$ >/run/qemu-ga-supervise.pid
while :; do
    qemu-ga -m virtio-serial -p "$1" -t /run/qemu-ga -f /run/qemu-ga.pid -l /run/qemu-ga/qemu-ga.log
    echo "VMLET-TESTVM: qemu-ga exit $?" >/dev/console
    rm -f /run/qemu-ga.pid
    sleep 1
done

#!/bin/sh
# Root shell on the serial console (inittab: ttyS0::respawn). It waits for a
# line of input first, so nothing is printed on the console (and mixed into
# the VMLET-TESTVM markers) until someone presses Enter there.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
read -r _line || exec sleep 2147483647
exec /bin/sh -l

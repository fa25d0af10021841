#!/bin/sh
# Clean-up before power-off: run by the ACPI power button handler and by
# init's ::shutdown action (poweroff/reboot from a shell).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
killall udhcpc acpid >/dev/null 2>&1
sync
if grep -q ' /mnt/datasource ' /proc/mounts; then
    umount /mnt/datasource || umount -l /mnt/datasource
fi
sync
echo
echo "VMLET-TESTVM: shutdown complete"

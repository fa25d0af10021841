#!/usr/bin/env bash
# The main job: set the host up, build the test VM image, boot it under libvirt and show it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$REPO/deploy/setup-host.sh"
IMAGE="$(bash "$REPO/deploy/images/build-test-image.sh")"
exec "$REPO/.venv/bin/python" "$REPO/deploy/demo.py" "$IMAGE" "$@"

#!/usr/bin/env bash
# The test command: set the host up, build the test VM image, run the whole suite.
# Extra arguments go to pytest (e.g. tests/run.sh tests/unit -x).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash deploy/setup-host.sh
# Build the image up front so a broken recipe fails loudly and early.
bash deploy/images/build-test-image.sh >/dev/null
exec .venv/bin/python -m pytest "$@"

#!/usr/bin/env bash
# What the tests need beyond Python packages: Debian's prometheus, which
# tests/test_monitoring.py starts for real. Without it that test skips, naming the
# binary, so a machine without apt (or without the right to use it) still runs the rest.
set -uo pipefail
if command -v prometheus >/dev/null; then
    exit 0
fi
if command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
    { $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; } \
        || echo "warning: could not install prometheus; tests/test_monitoring.py will skip" >&2
fi
exit 0

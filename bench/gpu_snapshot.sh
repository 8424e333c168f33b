#!/usr/bin/env bash
# A clean copy of HEAD for the GPU machine: .gpu_snapshot/ (git-ignored), carried by `run` with carry [".gpu_snapshot"].
# The working tree may hold half-done edits (helpers, work in progress) and the GPU copy's own .git is stale, so GPU
# runs use `git archive HEAD` plus the wheels; .commit names the commit (bench/soak.py's git_state reads it).
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu_snapshot
mkdir .gpu_snapshot
git archive HEAD | tar -x -C .gpu_snapshot
rm -rf .gpu_snapshot/tests/browser/shots .gpu_snapshot/bench/results  # not needed there; keeps the carry small
cp -r .whl .gpu_snapshot/.whl
git rev-parse HEAD > .gpu_snapshot/.commit
du -sh .gpu_snapshot | cut -f1 | xargs echo ".gpu_snapshot at $(git rev-parse --short HEAD):"

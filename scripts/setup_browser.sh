#!/usr/bin/env bash
# Debian's chromium + chromium-driver for the Playwright tests; Playwright never downloads a browser.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "[setup] installing Debian's chromium and chromium-driver"
$SUDO apt-get update -qq
# fonts-wqy-zenhei: Chinese prompts and Notes are readable in the screenshots.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver fonts-wqy-zenhei > /dev/null
/usr/bin/chromium --version

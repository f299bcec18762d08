#!/usr/bin/env bash
# Every test: installs the pinned emulators from npm, per their lockfiles (kinesalite;
# kinesis-mock for the lineage and fan-out tests; dynalite for the fleet's DynamoDB tables),
# then runs the unit and integration tests. The tests start the emulators and a backend
# themselves, on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
# The console's browser tests drive Debian's headless Chromium over chromedriver.
if ! command -v chromedriver >/dev/null || ! command -v chromium >/dev/null; then
  sudo=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && sudo="sudo"
  apt() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get "$@" -qq >/dev/null; }
  apt install -y chromium chromium-driver || { apt update && apt install -y chromium chromium-driver; }
fi
npm ci --prefix tools/kinesalite --no-audit --no-fund --loglevel=error
npm ci --prefix tools/kinesis-mock --no-audit --no-fund --loglevel=error
npm ci --prefix tools/dynalite --no-audit --no-fund --loglevel=error
cargo test --all-targets
# The demos check their own reports against the data they wrote.
bash scripts/demo.sh | tail -n 9
bash scripts/fleet-demo.sh | tail -n 13
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings

#!/usr/bin/env bash
# The main job on this machine, with nothing but the repo: starts a local Kinesis
# (kinesalite), writes realistic events with deletion requests among them, starts a small
# local backend, shows `rules test` and a dry-run, runs the daemon and shows what it did.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d tools/kinesalite/node_modules/kinesalite ]; then
  npm ci --prefix tools/kinesalite --no-audit --no-fund --loglevel=error
fi
cargo build --quiet --bin gdpr-consumer --example demo
GDPR_CONSUMER_BIN="$PWD/target/debug/gdpr-consumer" target/debug/examples/demo

#!/usr/bin/env bash
# A fleet of three workers on this machine, with nothing but the repo: starts a local Kinesis
# (kinesalite) and a local DynamoDB (dynalite) for the fleet's tables, writes events with
# deletion requests among them, starts a small local backend and three daemons sharing the
# stream; kills one (kill -9), shows its shards taken over, stops the others (SIGTERM), shows
# the shared state, and checks its report against the data it wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in kinesalite dynalite; do
  if [ ! -d "tools/$tool/node_modules/$tool" ]; then
    npm ci --prefix "tools/$tool" --no-audit --no-fund --loglevel=error
  fi
done
cargo build --quiet --bin gdpr-consumer --example fleet_demo
GDPR_CONSUMER_BIN="$PWD/target/debug/gdpr-consumer" target/debug/examples/fleet_demo

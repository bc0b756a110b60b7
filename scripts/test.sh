#!/usr/bin/env bash
# The test command: services up (installed/started when missing), then every
# test of the workspace against the real PostgreSQL and brokers.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup
log "cargo test --workspace"
cargo test --workspace "$@"

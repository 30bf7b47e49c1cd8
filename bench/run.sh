#!/usr/bin/env bash
# Meshwork's benchmarks, in one command: bash bench/run.sh [mesh-bench flags]
#
# Installs what is missing (Debian's nginx and wrk with apt-get, Consul with
# deploy/scripts/install-consul.sh), builds the release binaries, and runs
# mesh-bench, which prints every figure as a ratio against a baseline
# measured in the same run and writes bench/results/latest.json.
# Extra flags go to mesh-bench (`--phases dataplane,memory`, `--rounds 1`,
# `--duration-secs 3`; see `target/release/mesh-bench --help`).
#
# Every process the run starts is in one process group, killed when the
# script ends, whichever way it ends.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
started=$SECONDS

say() { echo "bench: $*" >&2; }

# --- what the run needs ---------------------------------------------------
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
for tool in taskset; do
  command -v "$tool" >/dev/null 2>&1 || { say "$tool is missing (util-linux)"; exit 1; }
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    say "missing: ${missing[*]}; install them (Debian: apt-get install --no-install-recommends ${missing[*]})"
    exit 1
  fi
  say "installing Debian's ${missing[*]}"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
consul=$(bash "$root/deploy/scripts/install-consul.sh" | tail -n 1)

# --- build ------------------------------------------------------------------
say "building the release binaries"
(cd "$root" && cargo build --release -p mesh-proxy -p mesh-registry-bridge -p mesh-bench)
target=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="$target/release"

# --- run --------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/mesh-bench.XXXXXX")
bench_pid=
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ -n "$bench_pid" ]; then
    # mesh-bench leads its own process group: every proxy, nginx, Consul,
    # bridge, upstream and wrk it started is in it.
    kill -KILL -- "-$bench_pid" 2>/dev/null || true
    wait "$bench_pid" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] && [ -d "$work" ]; then
    say "logs of the failed run: $work"
  else
    rm -rf "$work"
  fi
  say "total time $((SECONDS - started))s"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say "measuring (scratch files in $work)"
setsid "$bin/mesh-bench" \
  --work "$work" \
  --out "$here/results/latest.json" \
  --bin-dir "$bin" \
  --consul "$consul" \
  "$@" &
bench_pid=$!
wait "$bench_pid"

#!/usr/bin/env bash
# Writes Prometheus file_sd target files from Consul's catalog, as
# Prometheus' own Consul discovery would see them, for Prometheus builds
# without it (Debian 12's `prometheus` has consul_sd_configs disabled).
#
#   consul-targets.sh [--once] DIR
#
# For each service in MESH_SD_SERVICES (default: "mesh-proxy mesh-control")
# it writes DIR/<service>.json: one target group per instance, its address
# `service address (else node address):port`, and the labels Consul
# discovery gives (__meta_consul_node, __meta_consul_address,
# __meta_consul_service, __meta_consul_service_id,
# __meta_consul_service_address, __meta_consul_service_port,
# __meta_consul_service_metadata_<key>, __meta_consul_tags,
# __meta_consul_dc), so prometheus.yml's relabel_configs work on either.
# Files are replaced atomically; Prometheus re-reads them when they change.
#
# It follows the catalog with blocking queries and rewrites the files on
# every change, until stopped; with --once it writes them once and exits
# (non-zero when Consul does not answer). When Consul does not answer it
# keeps the last files and tries again with backoff.
#
# Consul: CONSUL_HTTP_ADDR (default 127.0.0.1:8500, http:// assumed),
# CONSUL_HTTP_TOKEN (a token that may read the catalog; sent in a header,
# never on the command line). Needs curl and jq.
set -euo pipefail

once=false
if [ "${1:-}" = "--once" ]; then
  once=true
  shift
fi
if [ $# -ne 1 ]; then
  echo "usage: consul-targets.sh [--once] DIR" >&2
  exit 64
fi
dir=$1
for tool in curl jq; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "consul-targets: $tool is missing (Debian: apt-get install $tool)" >&2
    exit 69
  }
done
mkdir -p "$dir"

consul=${CONSUL_HTTP_ADDR:-127.0.0.1:8500}
case $consul in
  http://* | https://*) ;;
  *) consul="http://$consul" ;;
esac
services=${MESH_SD_SERVICES:-mesh-proxy mesh-control}

# One target group per instance, labelled as consul_sd_configs labels it.
# shellcheck disable=SC2016
to_file_sd='[ .[] | {
  targets: [
    ((if (.ServiceAddress // "") != "" then .ServiceAddress else .Address end)
     | if test(":") then "[\(.)]" else . end) + ":\(.ServicePort)"
  ],
  labels: ({
    __meta_consul_node: .Node,
    __meta_consul_address: .Address,
    __meta_consul_dc: (.Datacenter // ""),
    __meta_consul_service: .ServiceName,
    __meta_consul_service_id: .ServiceID,
    __meta_consul_service_address: (.ServiceAddress // ""),
    __meta_consul_service_port: (.ServicePort | tostring),
    __meta_consul_tags: ("," + ((.ServiceTags // []) | join(",")) + ",")
  } + ((.ServiceMeta // {}) | with_entries(
        .key |= "__meta_consul_service_metadata_" + gsub("[^a-zA-Z0-9_]"; "_"))))
} ]'

# GET from Consul; the token goes in a header read from a file descriptor,
# so that no command line shows it. Called in a subshell only (a command
# substitution or `&`), which curl replaces: a signal to that pid reaches
# curl itself.
consul_get() {
  local path=$1
  shift
  if [ -n "${CONSUL_HTTP_TOKEN:-}" ]; then
    exec curl -sS -f "$@" -H @<(printf 'X-Consul-Token: %s\n' "$CONSUL_HTTP_TOKEN") "$consul$path"
  else
    exec curl -sS -f "$@" "$consul$path"
  fi
}

# Writes DIR/<service>.json for every service; fails without touching a
# file when one read fails.
write_all() {
  local svc out tmp
  local -A rendered=()
  for svc in $services; do
    out=$(consul_get "/v1/catalog/service/$svc" --max-time 10) || return 1
    rendered[$svc]=$(jq "$to_file_sd" <<<"$out") || return 1
  done
  for svc in $services; do
    tmp=$(mktemp "$dir/.$svc.json.XXXXXX")
    printf '%s\n' "${rendered[$svc]}" >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$dir/$svc.json"
  done
}

if $once; then
  write_all || {
    echo "consul-targets: cannot read the catalog from $consul" >&2
    exit 1
  }
  exit 0
fi

headers=$(mktemp)
watch=
# The blocking query runs in the background so that a signal ends the
# script at once, not after the query's 5 minutes.
trap 'rm -f "$headers"; [ -z "$watch" ] || kill "$watch" 2>/dev/null; exit 0' TERM INT
index=0
backoff=1
failing=false
while :; do
  # Blocks until a service is registered, deregistered or changes (or 5m).
  consul_get "/v1/catalog/services?index=$index&wait=5m" --max-time 330 -D "$headers" -o /dev/null &
  watch=$!
  if wait "$watch" && write_all; then
    watch=
    next=$(tr -d '\r' <"$headers" | awk -F': ' 'tolower($1) == "x-consul-index" { print $2 }')
    # An index that went backwards (Consul restored or replaced): start over.
    if [ -z "$next" ] || [ "$next" -lt "$index" ]; then next=0; fi
    if $failing; then
      echo "consul-targets: $consul answers again" >&2
      failing=false
    fi
    # Index 0 answers at once: pace the loop instead of spinning.
    if [ "$next" -eq 0 ]; then sleep 1; fi
    index=$next
    backoff=1
  else
    watch=
    if ! $failing; then
      echo "consul-targets: cannot read the catalog from $consul; keeping the last files, retrying" >&2
      failing=true
    fi
    sleep "$backoff"
    backoff=$((backoff < 30 ? backoff * 2 : 30))
    index=0
  fi
done

#!/usr/bin/env bash
# Installs a Consul binary where none is on PATH.
#
# On Debian, Consul is packaged in the `bullseye` suite only. This script adds
# that suite in a private apt folder (sources, lists and cache of its own),
# built from the machine's own Debian sources, downloads the `consul` package
# and unpacks its binary. The machine's apt configuration is never touched.
#
# Usage: install-consul.sh [PREFIX]   (default PREFIX: $MESH_HOME or ~/.local/share/meshwork)
# Prints the path of the consul binary on its last line.
set -euo pipefail

prefix="${1:-${MESH_HOME:-$HOME/.local/share/meshwork}}"
bin="$prefix/bin/consul"

if command -v consul >/dev/null 2>&1; then
  command -v consul
  exit 0
fi
if [ -x "$bin" ]; then
  echo "$bin"
  exit 0
fi

if [ ! -r /etc/os-release ] || ! grep -qi '^ID=debian\|^ID_LIKE=.*debian' /etc/os-release; then
  echo "install-consul: not a Debian system; install Consul (1.8 or newer) yourself and put it on PATH" >&2
  exit 1
fi
src=/etc/apt/sources.list.d/debian.sources
if [ ! -r "$src" ]; then
  echo "install-consul: $src not found; install Consul yourself and put it on PATH" >&2
  exit 1
fi

work="$prefix/apt"
mkdir -p "$work/sources.list.d" "$work/lists/partial" "$work/archives/partial" "$prefix/bin"
# The machine's own mirror, with the bullseye suite in place of its suites.
uri=$(awk '/^URIs:/ {print $2; exit}' "$src")
keyring=$(awk '/^Signed-By:/ {print $2; exit}' "$src")
cat >"$work/sources.list.d/bullseye.sources" <<SRC
Types: deb
URIs: $uri
Suites: bullseye
Components: main
Signed-By: $keyring
SRC

apt_opts=(
  -o "Dir::Etc::SourceList=/dev/null"
  -o "Dir::Etc::SourceParts=$work/sources.list.d"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::Cache::Archives=$work/archives"
  -o "Dir::Cache::pkgcache=$work/pkgcache.bin"
  -o "Dir::Cache::srcpkgcache=$work/srcpkgcache.bin"
  -o "APT::Sandbox::User=root"
)
echo "install-consul: fetching the bullseye package list into $work" >&2
apt-get "${apt_opts[@]}" -qq update >&2
cd "$work/archives"
apt-get "${apt_opts[@]}" -qq download consul >&2
deb=$(ls -t "$work"/archives/consul_*.deb | head -n 1)
unpack="$work/unpacked"
rm -rf "$unpack"
dpkg-deb -x "$deb" "$unpack"
install -m 0755 "$unpack/usr/bin/consul" "$bin.tmp"
mv "$bin.tmp" "$bin"
"$bin" version >&2
echo "$bin"

#!/usr/bin/env bash
# Builds, from Debian's packages, the public images that deploy/docker/Dockerfile
# and deploy/compose/docker-compose.yml name, for a machine whose Docker engine
# cannot pull them from a registry:
#
#   debian:bookworm-slim     debootstrap --variant=minbase bookworm, docker import
#   hashicorp/consul:1.8.7   that root file system + Debian's Consul 1.8.7 (the
#                            bullseye package deploy/scripts/install-consul.sh fetches)
#   prom/prometheus:v2.42.0  that root file system + Debian bookworm's prometheus
#
# Each image is laid out as the public one is used by the compose file
# (entrypoint, user, data folders), so the same files work with pulled images.
# An image whose tag exists is kept; --force rebuilds all three.
#
# The Debian mirror is the machine's own: the first `URIs:` of
# /etc/apt/sources.list.d/debian.sources (and its security one, for the
# image's apt sources), or the first `deb` line of /etc/apt/sources.list;
# MESH_DEBIAN_MIRROR overrides it.
#
# Needs root, debootstrap, dpkg-deb, apt-get and docker.
# Usage: base-images.sh [--force]
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

DEBIAN_TAG=debian:bookworm-slim
CONSUL_TAG=hashicorp/consul:1.8.7
CONSUL_VERSION=1.8.7
PROMETHEUS_TAG=prom/prometheus:v2.42.0
PROMETHEUS_VERSION=2.42.0

force=0
case "${1:-}" in
  --force) force=1 ;;
  "") ;;
  *) echo "base-images: unknown argument $1 (usage: base-images.sh [--force])" >&2; exit 2 ;;
esac

say() { echo "base-images: $*" >&2; }
die() { say "$*"; exit 1; }

have_image() { [ "$force" -eq 0 ] && docker image inspect "$1" >/dev/null 2>&1; }

if have_image "$DEBIAN_TAG" && have_image "$CONSUL_TAG" && have_image "$PROMETHEUS_TAG"; then
  say "$DEBIAN_TAG, $CONSUL_TAG and $PROMETHEUS_TAG exist"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap and chroot need it)"
for tool in debootstrap dpkg-deb apt-get docker tar; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (Debian: apt-get install debootstrap)"
done
docker info >/dev/null 2>&1 || die "the Docker engine does not answer (is dockerd running, may this user use it?)"

mirror="${MESH_DEBIAN_MIRROR:-}"
security=""
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list.d/debian.sources ]; then
  mirror=$(awk '/^URIs:/ && !/security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  security=$(awk '/^URIs:/ && /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -r /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || die "no Debian mirror found in the machine's apt sources; set MESH_DEBIAN_MIRROR"

work=$(mktemp -d "${TMPDIR:-/var/tmp}/mesh-base-images.XXXXXX")
cleanup() {
  # An interrupted debootstrap may leave its mounts in the root file system:
  # unmount them, and never let rm cross into another file system.
  for m in proc sys dev/pts dev; do umount -l "$work/bookworm/$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# The bookworm minbase root file system every image starts from.
rootfs="$work/bookworm"
say "debootstrap --variant=minbase bookworm from $mirror (a minute or two)"
if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1; then
  tail -n 20 "$work/debootstrap.log" >&2
  die "debootstrap failed (log above)"
fi
# As the public slim image: no package lists, no cached packages, no docs.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/usr/share/doc/* \
  "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/var/log/*.log
# The same apt sources as the public image.
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
if [ -n "$security" ]; then
  cat >>"$rootfs/etc/apt/sources.list.d/debian.sources" <<SRC

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
: >"$rootfs/etc/hostname"
: >"$rootfs/etc/resolv.conf"

# import ROOTFS TAG CHANGE...: tags the folder as an image.
import() {
  local dir=$1 tag=$2
  shift 2
  local changes=()
  for c in "$@"; do changes+=(--change "$c"); done
  tar --numeric-owner -C "$dir" -c . | docker import "${changes[@]}" - "$tag" >/dev/null
  say "tagged $tag"
}

# copy_rootfs NAME: a copy of the minbase root file system to add to.
copy_rootfs() {
  cp -a "$rootfs" "$work/$1"
  echo "$work/$1"
}

if ! have_image "$DEBIAN_TAG"; then
  import "$rootfs" "$DEBIAN_TAG" 'CMD ["bash"]'
fi

if ! have_image "$CONSUL_TAG"; then
  consul=$(bash "$repo/deploy/scripts/install-consul.sh" "$work/consul-install" | tail -n 1)
  # The whole output first: a reader that stops early would SIGPIPE the writer.
  version=$("$consul" version)
  version=${version%%$'\n'*}
  [ "$version" = "Consul v$CONSUL_VERSION" ] \
    || die "$consul is $version, not Consul $CONSUL_VERSION as $CONSUL_TAG must be"
  dir=$(copy_rootfs consul)
  install -m 0755 "$consul" "$dir/usr/bin/consul"
  chroot "$dir" useradd --system --user-group --home-dir /consul --no-create-home consul
  mkdir -p "$dir/consul/data" "$dir/consul/config"
  chroot "$dir" chown -R consul:consul /consul
  import "$dir" "$CONSUL_TAG" 'USER consul' 'WORKDIR /consul' 'VOLUME /consul/data' \
    'EXPOSE 8300 8301 8301/udp 8302 8302/udp 8500 8600 8600/udp' \
    'ENTRYPOINT ["consul"]' 'CMD ["agent", "-dev", "-client", "0.0.0.0"]'
fi

if ! have_image "$PROMETHEUS_TAG"; then
  # Debian bookworm's package, downloaded and unpacked (its only runtime
  # dependency is the C library); the machine's apt configuration is untouched.
  debs="$work/prometheus-deb"
  mkdir -p "$debs/lists/partial" "$debs/archives/partial" "$debs/sources.list.d"
  cat >"$debs/sources.list.d/debian.sources" <<SRC
Types: deb
URIs: $mirror
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  if [ -n "$security" ]; then
    cat >>"$debs/sources.list.d/debian.sources" <<SRC

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt_opts=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$debs/sources.list.d"
    -o "Dir::State::Lists=$debs/lists"
    -o "Dir::Cache::Archives=$debs/archives"
    -o "Dir::Cache::pkgcache=$debs/pkgcache.bin"
    -o "Dir::Cache::srcpkgcache=$debs/srcpkgcache.bin"
    -o "APT::Sandbox::User=root"
  )
  say "fetching Debian bookworm's prometheus package"
  apt-get "${apt_opts[@]}" -qq update >&2
  (cd "$debs" && apt-get "${apt_opts[@]}" -qq download prometheus >&2)
  debs_found=("$debs"/prometheus_*.deb)
  deb=${debs_found[-1]}
  [ -f "$deb" ] || die "apt-get download prometheus left no package in $debs"
  dpkg-deb -x "$deb" "$debs/unpacked"
  version=$("$debs/unpacked/usr/bin/prometheus" --version 2>&1)
  version=${version%%$'\n'*}
  case "$version" in
    *"version $PROMETHEUS_VERSION"*) ;;
    *) die "Debian's prometheus is $version, not $PROMETHEUS_VERSION as $PROMETHEUS_TAG must be" ;;
  esac
  dir=$(copy_rootfs prometheus)
  install -m 0755 "$debs/unpacked/usr/bin/prometheus" "$dir/usr/bin/prometheus"
  install -m 0755 "$debs/unpacked/usr/bin/promtool" "$dir/usr/bin/promtool"
  mkdir -p "$dir/usr/share/prometheus" "$dir/etc/prometheus" "$dir/prometheus"
  cp -a "$debs/unpacked/usr/share/prometheus/." "$dir/usr/share/prometheus/"
  cp -a "$debs/unpacked/etc/prometheus/." "$dir/etc/prometheus/"
  chroot "$dir" chown nobody:nogroup /prometheus
  import "$dir" "$PROMETHEUS_TAG" 'USER nobody' 'WORKDIR /prometheus' 'VOLUME /prometheus' \
    'EXPOSE 9090' 'ENTRYPOINT ["/usr/bin/prometheus"]' \
    'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]'
fi

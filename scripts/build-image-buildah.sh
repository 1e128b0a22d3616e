#!/usr/bin/env bash
# Build docker/<engine>.Dockerfile without a Docker daemon, with Debian's buildah, against a LOCAL base image.
# Optional: CI does not run it (a build takes minutes and gigabytes); it exercises the Dockerfile's own steps
# (COPY set, the --no-deps pip install, the install check, the metadata) where the official GPU base images
# cannot be pulled. The result is a test image, not a servable one: the local base carries no engine.
#
#   sudo bash scripts/build-image-buildah.sh sglang            # or: vllm
#   sudo BASE_IMAGE=localhost/my-base:tag bash scripts/build-image-buildah.sh vllm
#
# Needs root and `apt-get install buildah mmdebstrap` (Debian 12 ships buildah 1.28, mmdebstrap 1.3).
# Environment:
#   BASE_IMAGE   base to build on instead of the Dockerfile's FROM (default: a local Python base, made with
#                mmdebstrap on first use and tagged localhost/fmbc-python-base:$SUITE)
#   SUITE        Debian suite of that base (default: the host's, so mmdebstrap reuses the host's apt sources)
#   TAG          image tag (default: localhost/fmbc-serve-<engine>:buildah-test)
#   CA_BUNDLE    CA certificates for pip inside the build (default: /etc/ssl/certs/ca-certificates.crt); it is
#                copied into the local base, because the builds here only reach the registries through it
#   BUILDAH_STORAGE_DRIVER  default vfs (no overlay mounts needed)
# Prints the image tag last.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
engine=${1:?usage: build-image-buildah.sh sglang|vllm}
dockerfile=$here/docker/$engine.Dockerfile
[ -f "$dockerfile" ] || { echo "build-image-buildah.sh: no $dockerfile" >&2; exit 2; }
command -v buildah >/dev/null || { echo "build-image-buildah.sh: install buildah (apt-get install buildah)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "build-image-buildah.sh: run as root (vfs storage + chroot isolation)" >&2; exit 2; }

storage=${BUILDAH_STORAGE_DRIVER:-vfs}
bh=(buildah --storage-driver "$storage")
suite=${SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}")}
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
tag=${TAG:-localhost/fmbc-serve-$engine:buildah-test}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

make_base() {  # a minimal Debian with python3 + pip, as an image named $1
  command -v mmdebstrap >/dev/null || { echo "build-image-buildah.sh: apt-get install mmdebstrap" >&2; exit 2; }
  echo "build-image-buildah.sh: making $1 with mmdebstrap ($suite)" >&2
  mmdebstrap --variant=apt --include=python3,python3-pip,python3-venv,ca-certificates \
    "$suite" "$work/rootfs.tar" >&2
  cp "$ca_bundle" "$work/ca-certificates.crt"
  cat >"$work/Containerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
EOF
  "${bh[@]}" build --isolation chroot -f "$work/Containerfile" -t "$1" "$work" >&2
}

base=${BASE_IMAGE:-}
if [ -z "$base" ]; then
  base=localhost/fmbc-python-base:$suite
  "${bh[@]}" inspect --type image "$base" >/dev/null 2>&1 || make_base "$base"
fi

# Replace the Dockerfile's FROM by $base: `buildah build --from` where this buildah has it, else a copy of the
# Dockerfile with its (only) FROM line rewritten. The build context stays the repository root (.dockerignore).
from_args=()
if buildah build --help 2>/dev/null | grep -q -- '--from'; then
  from_args=(--from "$base")
else
  sed "0,/^FROM /s|^FROM .*|FROM $base|" "$dockerfile" >"$work/Dockerfile"
  dockerfile=$work/Dockerfile
fi

echo "build-image-buildah.sh: building $tag from $base" >&2
"${bh[@]}" build --isolation chroot --pull=false "${from_args[@]}" -f "$dockerfile" -t "$tag" "$here" >&2

# Smoke check inside the image (`podman run` does not work here; `buildah run` with chroot isolation does):
# the package metadata is installed with both engine entry points, and the image's default command is set.
ctr=$("${bh[@]}" from --pull=false "$tag")
trap 'rm -rf "$work"; "${bh[@]}" rm "$ctr" >/dev/null 2>&1 || true' EXIT
"${bh[@]}" run --isolation chroot "$ctr" -- python3 -c "from importlib.metadata import distribution; \
print(sorted({e.group for e in distribution('fmbc-serve').entry_points}))" >&2
"${bh[@]}" inspect --format '{{.OCIv1.Config.Cmd}}' "$tag" >&2
echo "$tag"

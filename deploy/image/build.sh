#!/usr/bin/env bash
# Builds the Isthmus OCI image from binaries already built by cargo:
#
#   deploy/image/build.sh [--profile release|debug] [--tag NAME:TAG] [--no-build] [--context DIR]
#
# Stages a context (the Containerfile, /etc files, the three binaries in /usr/local/bin and
# exactly the shared objects `ldd` lists for them, at the paths the binaries look for them),
# then runs `buildah bud`. Without --no-build it first runs the cargo build of the three
# binaries for the profile. Release is what ships; CI uses debug, the binaries `cargo test`
# has already built, to stay within its time (debug info is stripped while staging).
# Prints the image name on the last line. With --context DIR it only stages the context into
# DIR (for `docker build DIR` or `podman build DIR`) and prints DIR.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=release
tag=""
build=1
context=""
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs release or debug}"; shift 2 ;;
        --tag) tag="${2:?--tag needs NAME:TAG}"; shift 2 ;;
        --no-build) build=0; shift ;;
        --context) context="${2:?--context needs a directory}"; shift 2 ;;
        *) echo "usage: $0 [--profile release|debug] [--tag NAME:TAG] [--no-build] [--context DIR]" >&2; exit 64 ;;
    esac
done
case "$profile" in
    release) dir=target/release; cargo_profile=(--release) ;;
    debug) dir=target/debug; cargo_profile=() ;;
    *) echo "error: --profile must be release or debug, not '$profile'" >&2; exit 64 ;;
esac
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag="${tag:-localhost/isthmus:${version}}"
bins=(isthmus-gateway isthmus-route-sync isthmus-dns-shim)

[ -n "$context" ] || command -v buildah >/dev/null || { echo "error: buildah not found (Debian: apt-get install -y buildah)" >&2; exit 1; }
if [ "$build" = 1 ]; then
    cargo build --locked "${cargo_profile[@]}" -p isthmus-gateway -p isthmus-route-sync -p isthmus-dns-shim --bins
fi

if [ -n "$context" ]; then
    [ ! -e "$context" ] || [ -z "$(ls -A "$context")" ] || { echo "error: --context $context exists and is not empty" >&2; exit 64; }
    mkdir -p "$context"
    ctx=$context
else
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx"' EXIT
fi
root="$ctx/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
chmod 1777 "$root/tmp"
cp deploy/image/Containerfile "$ctx/"
cp deploy/image/etc/passwd deploy/image/etc/group deploy/image/etc/nsswitch.conf "$root/etc/"
for bin in "${bins[@]}"; do
    [ -x "$dir/$bin" ] || { echo "error: $dir/$bin missing: build it first (cargo build ${cargo_profile[*]} -p ${bin})" >&2; exit 1; }
    if command -v objcopy >/dev/null; then
        objcopy --strip-debug "$dir/$bin" "$root/usr/local/bin/$bin"
    else
        cp "$dir/$bin" "$root/usr/local/bin/$bin"
    fi
    chmod 0755 "$root/usr/local/bin/$bin"
done
# Every absolute path ldd prints (the `=> /path` targets and the loader), copied with its
# symlinks resolved to the very path the binary asks for. A library ldd cannot find fails
# the build rather than an image that cannot start.
if ldd "$dir"/isthmus-* 2>&1 | grep -q 'not found'; then
    ldd "$dir"/isthmus-* >&2
    echo "error: a shared object of the binaries was not found" >&2
    exit 1
fi
for lib in $(for bin in "${bins[@]}"; do ldd "$dir/$bin"; done | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done
echo "staged: $(cd "$root" && find . -type f | sort | tr '\n' ' ')" >&2
if [ -n "$context" ]; then
    echo "$context"
    exit 0
fi

buildah bud --layers=false -f "$ctx/Containerfile" -t "$tag" "$ctx" >&2
echo "$tag"

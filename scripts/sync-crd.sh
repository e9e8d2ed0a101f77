#!/usr/bin/env bash
# Copies the one source of truth of the TrainingJob CRD (crds/trainingjob.yaml) into the Helm
# chart (charts/relaunch/crds/), which Helm only reads from inside the chart folder.
# tests/test_chart.py fails when the two differ; run this after editing crds/trainingjob.yaml.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src="$root/crds/trainingjob.yaml"
dst="$root/charts/relaunch/crds/trainingjob.yaml"
if [ ! -f "$src" ]; then
  echo "sync-crd: $src not found; it is the CRD's source of truth and must exist" >&2
  exit 1
fi
mkdir -p "$(dirname "$dst")"
cp "$src" "$dst"
echo "sync-crd: copied crds/trainingjob.yaml to charts/relaunch/crds/trainingjob.yaml"

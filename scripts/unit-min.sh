#!/usr/bin/env bash
# The unit tests against the LOWEST version of every runtime dependency pyproject.toml allows:
# each "NAME>=X" becomes "NAME==X", installed as binary wheels into a venv of its own
# (.venv-min, reused between runs), the test tools at whatever versions pip picks beside them.
# A lower bound too low for what the code uses makes an install or a test fail here.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV_MIN:-.venv-min}
lowest=$(mktemp)
trap 'rm -f "$lowest"' EXIT
"$PYTHON" - >"$lowest" <<'PY'
import re
import sys
import tomllib

with open("pyproject.toml", "rb") as handle:
    dependencies = tomllib.load(handle)["project"]["dependencies"]
for dependency in dependencies:
    found = re.match(r"\s*([A-Za-z0-9._-]+)\s*(?:[^;]*,)?\s*>=\s*([0-9][^,;\s]*)", dependency)
    if found is None:
        sys.exit(f"unit-min: pyproject.toml: {dependency!r} has no lower bound (>=VERSION)")
    print(f"{found[1]}=={found[2]}")
PY
echo "unit-min: lowest allowed versions: $(tr '\n' ' ' <"$lowest")"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/pip" --quiet --disable-pip-version-check)
"${pip[@]}" install --only-binary=:all: -r "$lowest"
# The package and its test tools, with the runtime dependencies held at the versions above.
"${pip[@]}" install --constraint "$lowest" -e '.[test]'
"${pip[@]}" check
# test_dockerfile.py checks the Dockerfile and the lock file, not the code against these versions.
exec "$VENV/bin/python" -m pytest -q tests -p no:cacheprovider --deselect tests/test_dockerfile.py "$@"

#!/usr/bin/env bash
# Downloads, here, the wheels that benchmarks/gpu.sh needs on the GPU machine and that its image lacks
# (the device README's package list): simmim's config (pydantic), its stateful loader (torchdata) and the
# datasets library (for parquet and Hub data), at the versions this checkout's venv tests, for that
# machine's Python 3.12 on x86-64. gpu.sh installs them from .whl/ into /tmp/site.
#
#   bash benchmarks/gpu_wheels.sh          # then carry .whl (device run: carry [".whl"])
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
EXCLUDE=$(git rev-parse --git-path info/exclude)  # .git may be a file (a worktree)
mkdir -p "$(dirname "$EXCLUDE")"
grep -qx "/.whl/" "$EXCLUDE" 2>/dev/null || echo "/.whl/" >> "$EXCLUDE"
PACKAGES=(torchdata pydantic pydantic-core annotated-types typing-inspection typing-extensions datasets dill multiprocess)
PINS=$("$PY" - "${PACKAGES[@]}" <<'PYEOF'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
PYEOF
)
rm -rf .whl && mkdir -p .whl
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
# shellcheck disable=SC2086  # PINS is a list of name==version
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" --implementation cp \
    "${PLATFORMS[@]}" -d .whl $PINS
ls -1 .whl
du -sh .whl

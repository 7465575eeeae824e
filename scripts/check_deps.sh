#!/usr/bin/env bash
# Run the project at one end of its dependency ranges.
#
#   scripts/check_deps.sh lowest [--fresh]  # a venv holding the lower bound of every dependency, installed exactly
#   scripts/check_deps.sh newest            # the environment of python3 as it is (CI's main install: the newest)
#
# lowest: the pins are read from pyproject.toml ("name>=X" of the dependencies and of the test extra installs as
# "name==X"; torch as $TORCH_PIN, default torch==2.13.0, the CPU wheel on the project's machines). The venv
# ($DEPS_VENV, default ${TMPDIR:-/tmp}/eac-deps-lowest) is rebuilt when the pins or the Python change and reused
# otherwise (--fresh: rebuild anyway). Then `pip check`, a fast subset of the tests ($DEPS_TESTS) and the fit below.
# newest: the fit only (CI runs the whole test suite in that environment anyway).
# The fit: the README's main job cut to 3 edits on testbed:tiny, through scripts/audit_warnings.py, which fails on
# a FutureWarning or DeprecationWarning of the project's, a transformers deprecation or an "indexing errors" line.
# Exits non-zero when any step fails. docs/install.md has the bounds and what this measured.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

END=${1:-lowest}
FRESH=${2:-}
case "$END" in lowest|newest) ;; *) echo "usage: $0 lowest [--fresh] | newest" >&2; exit 2 ;; esac

START=$SECONDS
step() { echo "check_deps[$END] $(( SECONDS - START ))s: $*"; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/eac-check-deps.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 EAC_CACHE_DIR="$WORK/cache"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$END" = lowest ]; then
    VENV=${DEPS_VENV:-${TMPDIR:-/tmp}/eac-deps-lowest}
    python3 - "${TORCH_PIN:-torch==2.13.0}" > "$WORK/pins.txt" <<'EOF'
import re, sys
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for req in project["dependencies"] + project["optional-dependencies"]["test"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)", req.strip())
    if not m:
        sys.exit(f"pyproject.toml: {req!r} has no plain lower bound to pin")
    name, extras, low = m.groups()
    print(sys.argv[1] if name == "torch" else f"{name}{extras or ''}=={low}")
EOF
    python3 --version >> "$WORK/pins.txt"
    if [ "$FRESH" = --fresh ] || ! cmp -s "$WORK/pins.txt" "$VENV/eac-pins.txt" || ! "$VENV/bin/python" -c "" 2>/dev/null; then
        step "building $VENV with: $(grep -v '^Python' "$WORK/pins.txt" | tr '\n' ' ')"
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        mapfile -t PINS < <(grep -v '^Python' "$WORK/pins.txt")
        "$VENV/bin/python" -m pip install -q --no-compile "${PINS[@]}"  # no bytecode up front: compiled on import
        cp "$WORK/pins.txt" "$VENV/eac-pins.txt"
    else
        step "reusing $VENV (same pins)"
    fi
    # The project itself from this checkout (editable, its dependencies already pinned above).
    "$VENV/bin/python" -m pip install -q --no-deps -e "$REPO"
    PY="$VENV/bin/python"
    step "pip check"
    "$PY" -m pip check
else
    PY=python3
fi

"$PY" - <<'EOF'
from importlib.metadata import version
names = ["torch", "lightning", "transformers", "tokenizers", "safetensors", "huggingface-hub", "datasets",
         "torchmetrics", "jsonargparse", "matplotlib", "numpy", "accelerate", "pytest"]
print("versions: " + ", ".join(f"{n} {version(n)}" for n in names))
EOF

if [ "$END" = lowest ]; then
    # The dependency surface: transformers' models, caches and tokenizers (scoring, every family, the methods,
    # big-model loading), datasets and rouge-score (tasks), torchmetrics, safetensors (the edit log), the CLI parser.
    TESTS=${DEPS_TESTS:-tests/test_deps.py tests/test_evaluation.py tests/test_adapters_tracing.py tests/test_methods.py tests/test_offload.py tests/test_dtype_device.py tests/test_datamodule.py tests/test_literature_metrics.py}
    step "tests: $TESTS"
    # shellcheck disable=SC2086
    "$PY" -m pytest -q -m "not slow" -p no:cacheprovider $TESTS
fi

step "fit: 3 edits on testbed:tiny"
"$PY" scripts/audit_warnings.py fit --config configs/quickstart.yaml --model.model testbed:tiny \
    --data.num_edits 3 --trainer.enable_progress_bar false --trainer.default_root_dir "$WORK/run"
test -s "$WORK/run/summary.json"
step "done"

#!/usr/bin/env bash
# The wheels that MLflow needs on the lent GPU machine (kind nvidia-h200: Python 3.12.3, PyTorch 2.11, no MLflow,
# no network), downloaded here into DIR, which must then travel in the run's `carry` (64 MiB for the whole tree):
#
#   bash bench/gpu_wheels.sh DIR          # e.g. DIR=.whl, ignored through .git/info/exclude (`/.whl/`)
#   bash bench/gpu_check.sh --wheels DIR ...   # on the device: pip install --no-index --no-deps --target ...
#
# The set is what `nanosweep sweep`, `nanosweep train-group`, `nanosweep train` and pytest (tests/conftest.py,
# tests/test_gpu.py) import against a SQLite store (sqlite:///.../mlflow.db), as recorded from sys.modules of
# real runs, minus what the image already has (KINDS.md, "Python packages already there"). Versions are those
# of .venv (mlflow 3.17.2). What each one is for:
#   mlflow, mlflow-skinny, mlflow-tracing   MLflow itself (the three share the `mlflow` package)
#   sqlalchemy, alembic, mako               the SQLite store and its migrations (run when a store is created)
#   cryptography, cffi                      mlflow/store/model_registry/dbmodels/models.py (Fernet), loaded with
#                                           the SQL store; cryptography's bindings load cffi's _cffi_backend
#   pydantic, pydantic-core, annotated-types, typing-inspection    mlflow.entities, mlflow.utils.proto_json_utils
#   typing-extensions                       pydantic 2.14 / pydantic-core 2.50 require >=4.16.0; the image's
#                                           version is not known here, so the set brings 4.16.0 (backward compatible)
#   opentelemetry-api, -sdk, -proto, opentelemetry-semantic-conventions    mlflow.tracing, mlflow.protos
#   fastapi, starlette                      imported by `import mlflow` (mlflow.genai -> mlflow.gateway)
#   databricks-sdk                          imported by `import mlflow` (mlflow.genai.scorers)
#   cachetools                              mlflow.tracing
#   sqlparse                                mlflow.utils.search_utils (filter strings)
#   importlib-metadata                      mlflow.utils.requirements_utils
#   gitpython, gitdb, smmap                 the git context tags of every run
# Taken from the image (present there, and mlflow 3.17.2's bounds are wide): numpy, pandas, pyarrow, scipy,
# matplotlib, click, pyyaml, requests (+urllib3, idna, certifi, charset-normalizer), packaging, protobuf, anyio,
# annotated-doc, cloudpickle, markupsafe, zipp, python-dateutil, six, psutil, nvidia-ml-py, tqdm, pytest.
# Not brought: what only the `mlflow` command's server/UI side imports (flask, werkzeug, aiohttp, graphene, ...):
# the `mlflow` console script is not installed by `pip install --target` on the PATH anyway.
set -euo pipefail

if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: bash $0 DIR   (downloads MLflow's wheels for the nvidia-h200 image into DIR)" >&2
  exit 2
fi
dir="$1"
python="${PYTHON:-python3}"

wheels=(
  mlflow==3.17.2
  mlflow-skinny==3.17.2
  mlflow-tracing==3.17.2
  sqlalchemy==2.1.9
  alembic==1.20.1
  mako==1.4.3
  cryptography==50.0.2
  cffi==2.1.1
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  opentelemetry-api==1.45.2
  opentelemetry-sdk==1.45.2
  opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2
  fastapi==0.165.0
  starlette==1.10.0
  databricks-sdk==0.162.0
  cachetools==7.3.3
  sqlparse==0.6.1
  importlib-metadata==9.1.0
  gitpython==3.2.1
  gitdb==4.0.12
  smmap==5.0.3
)

mkdir -p "$dir"
staging="$(mktemp -d "${TMPDIR:-/tmp}/gpu-wheels.XXXXXX")"
trap 'rm -rf "$staging"' EXIT

# The device's Python (cp312) and platform (x86-64 glibc); pip matches each manylinux_2_N exactly.
"$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$staging/w" "${wheels[@]}" 2>"$staging/pip.log" || status=$?
# (this workplace's pip configuration names local indexes that pip reports missing for every package: not shown)
grep -v "is ignored: it is neither a file nor a directory" "$staging/pip.log" >&2 || true
[ "${status:-0}" -eq 0 ] || { echo "gpu_wheels: pip download failed (status $status)" >&2; exit 1; }

# Exactly one wheel per pin (two versions of one package stop the whole install on the device).
count="$(find "$staging/w" -maxdepth 1 -name '*.whl' | wc -l)"
if [ "$count" -ne "${#wheels[@]}" ]; then
  echo "gpu_wheels: expected ${#wheels[@]} wheels, pip gave $count:" >&2
  ls "$staging/w" >&2
  exit 1
fi

# DIR ends up holding exactly this set: wheels of an earlier run (other versions) go.
for old in "$dir"/*.whl; do
  [ -e "$old" ] || continue
  [ -e "$staging/w/$(basename "$old")" ] || { echo "gpu_wheels: removing $(basename "$old") from $dir" >&2; rm -f "$old"; }
done
mv -f "$staging"/w/*.whl "$dir"/

total=0
for f in "$dir"/*.whl; do
  size="$(stat -c %s "$f")" total=$((total + size))
  awk -v s="$size" -v n="$(basename "$f")" 'BEGIN { printf "%8.1f KiB  %s\n", s / 1024, n }'
done
awk -v b="$total" -v n="${#wheels[@]}" -v d="$dir" \
  'BEGIN { printf "gpu_wheels: %d wheels in %s, %.1f MiB in all (the tree that travels may hold 64 MiB)\n", n, d, b / 1048576 }'

#!/usr/bin/env bash
# Prepare .whl/: the packages benchmarks/gpu_suite.py needs that a GPU machine without network lacks (a CUDA image
# with Python 3.12, torch, transformers, numpy, Pillow, PyYAML, safetensors, psutil, filelock, msgpack, protobuf,
# click, requests, attrs ... but no DeepSpeed, diffusers, webdataset or Ray), for Python 3.12 on x86-64 Linux.
# Run once on a machine with pip access, in the repository root:
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/ (about 50 MB), ignored by git
#
# On the GPU machine, from the repository root (BENCHMARKS.md, "GPU suite", has the whole command):
#
#   mkdir -p $PWD/.site && tar xJf .whl/ray-*.tar.xz -C $PWD/.site &&
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $PWD/.site .whl/*.whl &&
#   export PYTHONPATH=$PWD:$PWD/.site
#
# Ray's wheel (79 MB) is larger than what a call may carry, so it travels as its installed tree without the Java
# jar (ray/jars, unused by Python), xz-compressed: about 28 MB. DeepSpeed is published as source only; its wheel is
# built here without compiled ops (uniemo uses none). The versions are those of the development environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${WHEEL_DIR:-.whl}  # another folder (outside the repository) for a dry run
mkdir -p "$OUT"
if [ "$OUT" = .whl ]; then  # never committed, and carried to the GPU machine only when a call names it
  exclude="$(git rev-parse --git-common-dir)/info/exclude"
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
fi

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$OUT" \
  diffusers==0.42.1 transformers==5.25.0 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
  importlib-metadata==10.2.0 lazy-importer==0.1.0

if ! ls "$OUT"/deepspeed-0.19.8-*.whl >/dev/null 2>&1; then
  # Built against the local torch (no build isolation: it would download torch again); no ops are compiled.
  DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" deepspeed==0.19.8
fi

if ! ls "$OUT"/ray-2.60.0-cp312-stripped.tar.xz >/dev/null 2>&1; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$tmp" ray==2.60.0
  mkdir "$tmp/tree"
  (cd "$tmp/tree" && unzip -q "$tmp"/ray-2.60.0-*.whl && rm -rf ray/jars)
  tar -C "$tmp/tree" -cf - . | xz -9 -T0 >"$OUT/ray-2.60.0-cp312-stripped.tar.xz"
fi
du -ch "$OUT"/* | tail -1

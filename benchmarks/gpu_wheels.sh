#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels the GPU machine's image lacks, into the git-ignored `.whl/`
# that the device tool's `carry` takes along (64 MiB in all with the working tree):
#   transformers (the zoo needs >= 5.24; the image had 5.17) and `datasets` with the two packages it needs that the
#   image does not have (dill, multiprocess). The versions are this machine's, so both machines run the same code.
# The GPU machine's Python is 3.12 on x86-64; pure-Python wheels only (no platform-specific build is needed).
#   bash benchmarks/gpu_wheels.sh                    # then: du -sh .whl
#   bash benchmarks/gpu_wheels.sh pyarrow==26.0.1    # extra requirements (here: if the image's pyarrow is < 24, which
#                                                    # datasets needs; about 40 MB more)
set -euo pipefail
cd "$(dirname "$0")/.."
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "transformers==$(version transformers)" "datasets==$(version datasets)" "dill==$(version dill)" \
    "multiprocess==$(version multiprocess)" "$@"
ls -l .whl
du -sh .whl

#!/usr/bin/env bash
# Run `benchmarks.gpu_campaign` on the GPU machine's own Python (see that module's docstring for the device tool's
# command and carry). First prints the versions found there; installs each wheel carried in `.whl/` whose package is
# missing there or older (`pip install --no-index --no-deps --target`, nothing downloaded) and says which; reads the
# corpora from the carried `.gpu_data/` unless HF_ZOO_DATA is set. Arguments go to the campaign.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY'
import importlib.metadata as m, platform
names = ["torch", "transformers", "datasets", "accelerate", "tokenizers", "safetensors", "huggingface_hub", "peft",
         "pyarrow", "fsspec", "dill", "multiprocess", "matplotlib", "numpy"]
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "missing"
print(f"python {platform.python_version()} ({platform.machine()}); " + ", ".join(f"{n} {version(n)}" for n in names))
PY
NEEDED=$("$PYTHON" - <<'PY'
import importlib.metadata as m, pathlib
def key(text):  # numeric release tuple, enough for the versions carried here
    return tuple(int(part) if part.isdigit() else 0 for part in text.split("+")[0].split("."))
for wheel in sorted(pathlib.Path(".whl").glob("*.whl")):
    name, version = wheel.name.split("-")[:2]
    try:
        installed = m.version(name)
    except m.PackageNotFoundError:
        installed = None
    if installed is None or key(installed) < key(version):
        print(wheel)
PY
)
if [ -n "$NEEDED" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/zoo-site \
        $NEEDED || { echo "error: installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/zoo-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export ZOO_WHEELS_INSTALLED=$(echo $NEEDED | xargs -n1 basename | tr '\n' ' ')
    echo "installed from .whl: $ZOO_WHEELS_INSTALLED"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export ZOO_WHEELS_INSTALLED=none
    echo "no carried wheel needed (.whl: $(ls .whl 2>/dev/null | wc -l) files)"
fi
export HF_ZOO_DATA=${HF_ZOO_DATA:-$PWD/.gpu_data} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" -m benchmarks.gpu_campaign "$@"

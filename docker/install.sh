#!/bin/sh
# The Docker image's install steps. .ci/run also runs them in a fresh venv (docker/check_install.sh),
# so that a broken pin or dependency is caught on machines without a Docker engine.
#
# Usage: sh docker/install.sh SOURCE_DIR [cpu|cuda]
#   Installs into the environment of the `python` on PATH.
#   cpu (default): torch from TORCH_INDEX_URL (default PyTorch's CPU index; set it empty to use
#   pip's own configuration, e.g. a local wheelhouse); cuda: PyPI's torch, which bundles CUDA.
set -eu
src=${1:?usage: install.sh SOURCE_DIR [cpu|cuda]}
variant=${2:-cpu}
case "$variant" in
    cpu) index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu} ;;
    cuda) index=${TORCH_INDEX_URL-} ;;
    *) echo "install.sh: unknown variant '$variant' (cpu or cuda)" >&2; exit 2 ;;
esac
if [ -n "$index" ]; then
    python -m pip install --no-cache-dir --index-url "$index" torch==2.13.0
else
    python -m pip install --no-cache-dir torch==2.13.0
fi
python -m pip install --no-cache-dir -r "$src/docker/requirements.txt"
python -m pip install --no-cache-dir --no-deps "$src"
python -m pip check
unimo-bids --version

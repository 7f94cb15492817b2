#!/bin/sh
# CI check of the Dockerfile's install steps without a Docker engine: docker/install.sh in a
# fresh venv (torch from pip's own configuration, i.e. the local CPU wheel), then the CLI runs.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python -m venv "$tmp/venv"
PATH="$tmp/venv/bin:$PATH" TORCH_INDEX_URL="" sh "$root/docker/install.sh" "$root" cpu
PATH="$tmp/venv/bin:$PATH" unimo-bids --help >/dev/null
echo "docker/install.sh: fresh venv install OK"

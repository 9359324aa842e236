#!/bin/sh
# Pull every [[model]] named in llmd's config that the model store does not hold yet.
# llmd loads models (preload = true warms them at start) but never pulls one: without this, the
# first request for a model the store lacks gets Ollama's 404. Models already present are left
# alone, so a node or host that has them starts without reaching the registry. A model used but
# not listed as a [[model]] must be pulled by hand (through llmd: POST /api/pull with an api_key).
# Usage: pull-models.sh [CONFIG]; OLLAMA_MODELS must be the store llmd's backends use.
set -eu
config=${1:-/etc/llmd/llmd.toml}
mkdir -p "${OLLAMA_MODELS:?set OLLAMA_MODELS to the backends' model store}"
# A private ollama on its own loopback port: llmd is not running yet.
export OLLAMA_HOST=127.0.0.1:11499
ollama serve >/tmp/pull-models-ollama.log 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
tries=0
until ollama list >/dev/null 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -gt 60 ]; then
        echo "pull-models: ollama serve did not answer within 60 s:" >&2
        cat /tmp/pull-models-ollama.log >&2
        exit 1
    fi
    sleep 1
done
models=$(python3 -c 'import sys, tomllib
for m in tomllib.load(open(sys.argv[1], "rb")).get("model", []):
    print(m["name"])' "$config")
for model in $models; do
    if ollama show "$model" >/dev/null 2>&1; then
        echo "pull-models: $model is present"
    else
        echo "pull-models: pulling $model"
        ollama pull "$model"
    fi
done

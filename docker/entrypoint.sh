#!/usr/bin/env bash
# Installs the mounted project (building its extension for this GPU) once per container, then runs the command.
set -euo pipefail
if [ -f /workspace/setup.py ] && ! python -c "import engine" 2>/dev/null; then
    pip install --no-deps --no-build-isolation -e /workspace >/tmp/dalle-install.log 2>&1 \
        || { cat /tmp/dalle-install.log; exit 1; }
fi
exec "$@"

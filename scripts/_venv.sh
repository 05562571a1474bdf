# Sourced by the scripts: create .venv from pyproject.toml on first use (or when
# pyproject.toml changed since), then put it first on PATH.  Needs only python3 >= 3.11.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.installed-from"
PY="${PYTHON:-python3}"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    echo "sharedmem: bootstrapping $VENV from pyproject.toml" >&2
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    # editable_mode=compat: a plain path entry, which mypy and pyright resolve (the default
    # import-hook editable install is invisible to type checkers).
    "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" \
        --config-settings editable_mode=compat >&2
    echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"

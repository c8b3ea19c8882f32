# Sourced by the scripts beside it: run from the repository root with the project's
# virtual environment first on PATH (as if activated), so Ray's processes and jobs started
# from here use the same python. VIRTUAL_ENV wins, then ./.venv, then the python on PATH.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BIN="${VIRTUAL_ENV:-$PWD/.venv}/bin"
[ -x "$BIN/python" ] || BIN="$(dirname "$(command -v python)")"
export PATH="$BIN:$PATH"
export RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_ENABLE_PRINT_PATCH=0

# absolute_dir DIR: create DIR and print its absolute path
absolute_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

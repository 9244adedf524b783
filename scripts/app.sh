#!/usr/bin/env bash
# Start the planner's web app on a fresh machine: install what it needs first, then streamlit.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r requirements.txt
exec python3 -m streamlit run app.py "$@"

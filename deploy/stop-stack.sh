#!/usr/bin/env bash
# Stops what deploy/serve-stack.sh started.
cd "$(dirname "$0")/.."
[ -f .modelforge/stack.pids ] || { echo "no stack running"; exit 0; }
while read -r pid; do kill "$pid" 2>/dev/null || true; done <.modelforge/stack.pids
rm -f .modelforge/stack.pids
echo "stack stopped"

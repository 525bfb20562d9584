#!/usr/bin/env bash
# Start the server. Under Home Assistant the add-on's options (/data/options.json) become its
# command line, and the server itself tells the Supervisor where to find it; under plain
# `docker run` the QWEN3TTS_* environment variables configure it. RUN_SH_EXEC replaces the
# final command (tests).
set -euo pipefail

options="${ADDON_OPTIONS:-/data/options.json}"
args=()
if [[ -f "${options}" ]]; then
    args_file="$(mktemp)"
    python3 -m wyoming_qwen3tts.addon args "${options}" > "${args_file}"
    mapfile -d '' -t args < "${args_file}"
    rm -f "${args_file}"
fi

exec ${RUN_SH_EXEC:-python3 -m wyoming_qwen3tts} "${args[@]}"

#!/usr/bin/env bash
# `make test`: the test suite once per test host ("leg"), each in its own venv under .host/:
#
#   ComfyUI 0.3.75   .host/0.3.75/{ComfyUI,venv}
#   ComfyUI 0.8.0    .host/0.8.0/{ComfyUI,venv}
#
#   scripts/run_tests.sh [PYTEST ARGS...]
#   TEST_HOSTS="0.8.0" scripts/run_tests.sh      only the legs named in TEST_HOSTS
#   COMFYUI_PATH=... COMFYUI_PYTHON=... scripts/run_tests.sh
#                                           one leg, on that ComfyUI (TEST_HOSTS is ignored)
#
# A leg whose host source cannot be had (0.8.0 with no ../shared/hosts tarball and no
# network) is skipped with one line saying so. Every other leg must pass: the exit status
# is non-zero when a leg's setup fails, its pytest fails, or its pytest ran no test (exit 5).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

HOSTS="${TEST_HOSTS:-0.3.75 0.8.0}"
if [[ -n "${COMFYUI_PATH:-}" ]]; then
    HOSTS="own"
fi

say() { printf '[make test] %s\n' "$*"; }

scripts/setup_system.sh || exit 1

# The random test checkpoints are written once into this store and hard-linked into each
# host's models folder (scripts/make_test_models.py): one copy on disk for every leg.
export VIDEOGRAIN_TEST_MODEL_STORE="${VIDEOGRAIN_TEST_MODEL_STORE:-$PWD/.host/test-models}"

summary=()
failed=0
ran=0
t_all=$SECONDS
for host in $HOSTS; do
    t0=$SECONDS
    label="ComfyUI $host"
    [[ "$host" == own ]] && label="ComfyUI at $COMFYUI_PATH"
    echo
    say "=== leg: $label ==="
    if [[ "$host" == own ]]; then
        env_line="$(scripts/setup_host.sh)"; rc=$?
    else
        env_line="$(scripts/setup_host.sh "$host")"; rc=$?
    fi
    if [[ $rc -eq 4 ]]; then
        summary+=("$label: SKIPPED (its source is unavailable here: see the [setup_host $host] line above)")
        continue
    elif [[ $rc -ne 0 ]]; then
        say "$label: host setup failed (exit $rc)"
        summary+=("$label: FAILED (host setup, exit $rc)")
        failed=1
        continue
    fi
    eval "$env_line"   # HOST_PYTHON=... COMFYUI_PATH=...
    if ! "$HOST_PYTHON" scripts/make_test_models.py --comfyui "$COMFYUI_PATH" --which small small_cnet; then
        summary+=("$label: FAILED (writing the test models)")
        failed=1
        continue
    fi
    # What this leg runs on, as the host's tree and Python say it (information only).
    (cd "$COMFYUI_PATH" && "$HOST_PYTHON" -c 'import comfyui_version, sys, torch
print("[make test] ComfyUI", comfyui_version.__version__, "| Python", sys.version.split()[0], "| torch", torch.__version__)') \
        || say "(the host's comfyui_version.py could not be read)"
    COMFYUI_PATH="$COMFYUI_PATH" "$HOST_PYTHON" -m pytest tests "$@"
    rc=$?
    ran=$((ran + 1))
    secs=$((SECONDS - t0))
    case $rc in
        0) summary+=("$label: passed in ${secs} s (setup included)") ;;
        5) summary+=("$label: FAILED: pytest collected no test (exit 5); check the pytest arguments")
           failed=1 ;;
        *) summary+=("$label: FAILED (pytest exit $rc) in ${secs} s")
           failed=1 ;;
    esac
    unset COMFYUI_PATH HOST_PYTHON
done

echo
for line in "${summary[@]}"; do
    say "$line"
done
if [[ $ran -eq 0 && $failed -eq 0 ]]; then
    say "FAILED: no leg ran (TEST_HOSTS='$HOSTS')"
    exit 1
fi
say "all legs: $((SECONDS - t_all)) s"
exit $failed

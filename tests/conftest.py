"""Test harness: a real ComfyUI host, in-process and as a server subprocess.

The host is the ComfyUI named by `COMFYUI_PATH` (`make test` runs the suite once per host
`scripts/setup_host.sh` builds: `.host/0.3.75/ComfyUI`, then `.host/0.8.0/ComfyUI`), else
`.host/0.3.75/ComfyUI`. Tests run with the host's python (`make test` arranges both).
Shared helpers live in `vg_testlib.py`.

Fixtures
- `comfy_host`      (session) the host imported in this process, CPU mode, custom nodes
                    (this pack) loaded; a namespace with `nodes`, `folder_paths`,
                    `execution`, `pack` and `run(prompt)` (execute an API prompt in-process).
- `test_models`     (session) the random SD1.5-format test checkpoints (see
                    scripts/make_test_models.py), written into the host's models folder.
- `comfy_server`    (session) `python main.py --cpu ...` on a free loopback port with its
                    own input/output/temp folders; a `ComfyClient` to talk to it. The server
                    log is kept under test-artifacts/ and printed when a test using it fails.
"""
from __future__ import annotations

import asyncio
import os
import sys
import types
import uuid

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
# The core is importable on its own; the repo root goes to the END of sys.path so that the
# host's top-level modules (`nodes`, `server`, ...) always win over the pack's `nodes/`.
if REPO not in sys.path:
    sys.path.append(REPO)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

from vg_testlib import PACK_NAME, comfyui_path, in_process_executor, load_script, start_server, stop_server  # noqa: E402

@pytest.fixture(scope="session")
def test_models():
    """Paths of the random test models (written once, reused while their recipe holds)."""
    comfy = comfyui_path()
    if comfy not in sys.path:
        sys.path.insert(0, comfy)
    from comfy.cli_args import args
    args.cpu = True
    maker = load_script("make_test_models")
    models_dir = os.path.join(comfy, "models")
    out = {}
    for which in ("small", "small_cnet"):
        path = maker.write_model(models_dir, which)
        out[which] = path
        out[which + "_name"] = os.path.basename(path)
    return types.SimpleNamespace(**out)


# ---------------------------------------------------------------- in-process host
@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory):
    comfy = comfyui_path()
    if comfy not in sys.path:
        sys.path.insert(0, comfy)
    from comfy.cli_args import args
    args.cpu = True  # before anything imports comfy.model_management
    # As main.py does: the host's `utils` package first (nodes.py later puts comfy/ on
    # sys.path, where comfy/utils.py would shadow it), then server before nodes.
    import utils.extra_config  # noqa: F401
    import server  # noqa: F401  (must precede `import nodes`, or some core nodes fail to load)
    import folder_paths
    import nodes
    import execution

    base = tmp_path_factory.mktemp("inproc")
    for kind in ("input", "output", "temp"):
        os.makedirs(base / kind, exist_ok=True)
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))

    if not any(k.startswith("VideoGrain") for k in nodes.NODE_CLASS_MAPPINGS) or not getattr(nodes, "_videograin_loaded", False):
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        nodes._videograin_loaded = True
    pack_module = next((m for name, m in sys.modules.items()
                        if name.endswith(PACK_NAME) and hasattr(m, "comfy_entrypoint")), None)

    class _Server:  # the executor only needs these attributes of the server
        client_id = None
        last_node_id = None
        def send_sync(self, *a, **k):
            pass

    def run(prompt: dict, outputs: list[str] | None = None):
        """Execute an API-format prompt in this process; returns the executor (its
        `history_result`, `success`, `status_messages`)."""
        ex = in_process_executor(execution, _Server())
        valid = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not valid[0]:
            raise AssertionError(f"prompt invalid: {valid[1]} {valid[3]}")
        ex.execute(prompt, str(uuid.uuid4()), {}, valid[2])
        return ex

    return types.SimpleNamespace(path=comfy, nodes=nodes, folder_paths=folder_paths,
                                 execution=execution, pack=pack_module, run=run, dirs=base)


_SERVERS: list = []


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, test_models):
    client = start_server(str(tmp_path_factory.mktemp("server")))
    _SERVERS.append(client)
    try:
        yield client
    finally:
        stop_server(client)
        _SERVERS.remove(client)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        for client in _SERVERS:
            try:
                tail = client.log_text()[-8000:]
            except OSError:
                continue
            rep.sections.append(("ComfyUI server log (tail)", tail))



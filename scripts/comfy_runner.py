"""Start a real ComfyUI server the way a user does and drive it over HTTP.

Used by the demo (`scripts/demo.py`), the benchmarks and the tests. Standard library only.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyClient:
    """Talks to a running ComfyUI over HTTP the way the web UI does."""

    def __init__(self, base_url: str, proc: subprocess.Popen, log_path: str, dirs: dict):
        self.base_url = base_url
        self.proc = proc
        self.log_path = log_path
        self.input_dir = dirs["input"]
        self.output_dir = dirs["output"]
        self.temp_dir = dirs["temp"]
        self.client_id = uuid.uuid4().hex

    def get(self, route: str, timeout: float = 30):
        with urllib.request.urlopen(self.base_url + route, timeout=timeout) as r:
            return json.loads(r.read().decode())

    def post(self, route: str, payload: dict | None, timeout: float = 30):
        data = json.dumps(payload or {}).encode()
        req = urllib.request.Request(self.base_url + route, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read().decode()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read().decode()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body

    def alive(self) -> bool:
        try:
            self.get("/system_stats", timeout=30)  # a loaded machine may answer slowly
            return self.proc.poll() is None
        except Exception:
            return False

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise PromptRejected(status, body)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """Wait for a queued prompt to finish; returns its /history entry."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                hist = self.get(f"/history/{prompt_id}")
            except (TimeoutError, urllib.error.URLError) as e:
                # A server busy loading a model on a loaded machine can leave one poll
                # unanswered for its 30 s; that is no answer yet, not a failure (the deadline
                # and the process check still bound the wait).
                if isinstance(e, urllib.error.URLError) and not isinstance(e.reason, TimeoutError):
                    raise
                if self.proc.poll() is not None:
                    raise AssertionError("the ComfyUI server died while running the prompt") from e
                continue
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            if self.proc.poll() is not None:
                raise AssertionError("the ComfyUI server died while running the prompt")
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run_with_progress(self, prompt: dict, report, timeout: float = 3600) -> dict:
        """Like `run`, calling `report(event, data)` for the server's websocket events
        of this prompt ("executing", "progress", ...) as they arrive."""
        import asyncio
        import aiohttp  # the host's own dependency

        # A new client id per run: the server drops an id's socket when the old connection
        # closes, which could race with the new connection under the same id.
        self.client_id = uuid.uuid4().hex

        async def go():
            ws_url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(ws_url) as ws:
                    prompt_id = self.queue(prompt)
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + timeout
                    while loop.time() < deadline:
                        try:
                            msg = await ws.receive(timeout=2)
                        except asyncio.TimeoutError:
                            msg = None
                        if msg is not None and msg.type == aiohttp.WSMsgType.TEXT:
                            event = json.loads(msg.data)
                            data = event.get("data") or {}
                            if data.get("prompt_id") in (None, prompt_id):
                                report(event.get("type"), data)
                                if event.get("type") in ("execution_success", "execution_error", "execution_interrupted"):
                                    break
                        elif msg is not None and msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break
                        if self.proc.poll() is not None:
                            raise AssertionError("the ComfyUI server died while running the prompt")
                    return prompt_id

        prompt_id = asyncio.run(go())
        entry = self.wait(prompt_id, timeout)
        if entry["status"]["status_str"] != "success":
            raise ExecutionFailed(entry)
        return entry

    def run(self, prompt: dict, timeout: float = 600) -> dict:
        """Queue, wait, and return the history entry; raises if execution failed."""
        entry = self.wait(self.queue(prompt), timeout)
        if entry["status"]["status_str"] != "success":
            raise ExecutionFailed(entry)
        return entry

    def run_expect_error(self, prompt: dict, timeout: float = 600) -> str:
        """Run a prompt that must fail; returns the error text (validation or execution)."""
        try:
            entry = self.wait(self.queue(prompt), timeout)
        except PromptRejected as e:
            return json.dumps(e.body)
        if entry["status"]["status_str"] == "success":
            raise AssertionError("the prompt was expected to fail but succeeded")
        msgs = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        return json.dumps(msgs)

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


class PromptRejected(Exception):
    def __init__(self, status, body):
        super().__init__(f"POST /prompt answered {status}: {body}")
        self.status, self.body = status, body


class ExecutionFailed(Exception):
    def __init__(self, entry):
        msgs = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
        super().__init__(f"prompt failed: {json.dumps(msgs)[:4000]}")
        self.entry = entry


# The host the scripts and tests use when COMFYUI_PATH is not set: the one
# `scripts/setup_host.sh` builds by default (others: .host/<version>/ComfyUI).
DEFAULT_HOST_VERSION = "0.3.75"


def default_comfyui(repo: str) -> str:
    return os.environ.get("COMFYUI_PATH") or os.path.join(repo, ".host", DEFAULT_HOST_VERSION, "ComfyUI")


# cache_args keys some host reads without a default: 0.3.75 and 0.8.0 read "lru" and
# "ram"; newer releases (0.38) also read "ram_inactive". The keys found in the host's own
# code are added to these (see executor_cache_args).
_KNOWN_CACHE_ARGS = ("lru", "ram", "ram_inactive")
_CACHE_ARG_USE = re.compile(r"""cache_args\s*(?:\[|\.get\(|\.pop\()\s*["'](\w+)["']""")
_CACHE_ARGS_LITERAL = re.compile(r"cache_args\s*=\s*\{([^{}]*)\}")
_DICT_KEY = re.compile(r"""["'](\w+)["']\s*:""")


def executor_cache_args(execution) -> dict:
    """The `cache_args` for an in-process `execution.PromptExecutor`, found by reading the
    host rather than by its version: every key its execution module reads from
    `cache_args` and every key its main.py hands the server's executor, each 0 (no LRU
    size, no RAM headroom), plus the keys known from releases that cannot be read here."""
    import inspect
    keys = dict.fromkeys(_KNOWN_CACHE_ARGS)
    sources = [inspect.getsource(execution)]
    main_py = os.path.join(os.path.dirname(os.path.abspath(execution.__file__)), "main.py")
    if os.path.isfile(main_py):
        with open(main_py, encoding="utf-8") as f:
            sources.append(f.read())
    for text in sources:
        keys.update(dict.fromkeys(_CACHE_ARG_USE.findall(text)))
        for literal in _CACHE_ARGS_LITERAL.findall(text):
            keys.update(dict.fromkeys(_DICT_KEY.findall(literal)))
    return {k: 0 for k in keys}


def in_process_executor(execution, server):
    """`execution.PromptExecutor(server, ...)` as the host's own server builds one, with
    the cache arguments that host reads (executor_cache_args); a host whose executor
    takes no `cache_args` gets none."""
    import inspect
    params = inspect.signature(execution.PromptExecutor).parameters
    if "cache_args" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return execution.PromptExecutor(server, cache_args=executor_cache_args(execution))
    return execution.PromptExecutor(server)


def start_server(comfy: str, workdir: str, log_path: str, python: str = sys.executable, extra_args=(),
                 timeout: float = 300, env: dict | None = None, dirs: dict | None = None) -> ComfyClient:
    """`python main.py ...` on a free loopback port, with input/output/temp/user folders
    under `workdir` (or as given in `dirs`); returns once the server answers."""
    dirs = {**{k: os.path.join(workdir, k) for k in ("input", "output", "temp", "user")}, **(dirs or {})}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    port = _free_port()
    cmd = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--input-directory", dirs["input"], "--output-directory", dirs["output"],
           "--temp-directory", dirs["temp"], "--user-directory", dirs["user"],
           "--database-url", "sqlite:///:memory:", *extra_args]
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()  # the child keeps its own handle
    client = ComfyClient(f"http://127.0.0.1:{port}", proc, log_path, dirs)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited during start-up:\n{client.log_text()[-6000:]}")
        try:
            client.get("/system_stats", timeout=2)
            return client
        except Exception:
            time.sleep(0.5)
    stop_server(client)
    raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{client.log_text()[-6000:]}")


def stop_server(client: ComfyClient):
    if client.proc.poll() is None:
        client.proc.terminate()
        try:
            client.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            client.proc.kill()
            client.proc.wait()



"""The README quickstart, executed verbatim.

The fenced ```bash and ```python blocks between `<!-- quickstart:begin -->` and
`<!-- quickstart:end -->` are run as written: the one holding `alto serve` starts the
server (a subprocess, as a user would run it), every other block runs against it. Only
the address is chosen by the test, through the variables the README itself uses
(`ALTO_PORT` for the server, `ALTO_URL` for the examples); `ALTO_SIM_TIME_SCALE` makes the
simulated engine fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.gateway_fixtures import REPO, free_port
from tests.waiting import eventually_sync

README = REPO / "README.md"
START_TIMEOUT_S = 60.0


def quickstart_blocks() -> list[tuple[str, str]]:
    text = README.read_text()
    m = re.search(r"<!-- quickstart:begin -->(.*?)<!-- quickstart:end -->", text, re.S)
    assert m, "README.md has no quickstart markers"
    return re.findall(r"^```(bash|python)\n(.*?)^```", m.group(1), re.S | re.M)


BLOCKS = quickstart_blocks()
SERVE = [code for lang, code in BLOCKS if lang == "bash" and "alto serve" in code]
EXAMPLES = [(lang, code) for lang, code in BLOCKS if not (lang == "bash" and "alto serve" in code)]


def test_quickstart_has_a_server_and_examples() -> None:
    assert len(SERVE) == 1
    assert sum(lang == "bash" for lang, _ in EXAMPLES) >= 4
    assert sum(lang == "python" for lang, _ in EXAMPLES) >= 1
    assert all("$ALTO_URL" in code for lang, code in EXAMPLES if lang == "bash")


@pytest.fixture(scope="module")
def readme_server() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ALTO_PORT": str(port), "ALTO_HOST": "127.0.0.1",
           "ALTO_SIM_TIME_SCALE": "0.001"}
    proc = subprocess.Popen(
        ["bash", "-c", SERVE[0]], cwd=REPO, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        def ready() -> bool:  # a process we cannot await: poll its readiness, bounded
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"`alto serve` exited with {proc.returncode}:\n{out}")
            try:
                return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        if not eventually_sync(ready, timeout=START_TIMEOUT_S, every=0.1):
            pytest.fail(f"`alto serve` was not ready within {START_TIMEOUT_S} s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the session started above: this server only
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def check_output(lang: str, code: str, out: str) -> None:
    """What each kind of example must print (beyond exiting 0)."""
    assert out.strip(), "the example printed nothing"
    assert not re.search(r'"error":\s*\{"message"', out), out[-2000:]  # OpenAI error shape
    assert "event: error" not in out and not out.startswith("error "), out[-2000:]
    if lang == "python":
        return  # checked by the caller
    if "/v1/models" in code:
        ids = {m["id"] for m in json.loads(out)["data"]}
        assert {"factool", "factool/default"} <= ids
    elif "chat/completions" in code and '"stream": true' in code:
        datas = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
        assert datas[-1] == "[DONE]"
        chunks = [json.loads(d) for d in datas[:-1]]
        assert chunks[-1]["usage"]["total_tokens"] > 0  # include_usage
        assert any(c.get("alto", {}).get("stage") == "claims" for c in chunks)
    elif "chat/completions" in code:
        done = json.loads(out)
        assert done["object"] == "chat.completion"
        assert len(done["alto"]["output"]["claims"]) >= 2
    elif "Last-Event-ID" in code:
        events = re.findall(r"^event: (\w+)$", out, re.M)
        assert events and events[0] != "run" and events[-1] == "result"  # resumed after it
    elif "text/event-stream" in code:
        events = re.findall(r"^event: (\w+)$", out, re.M)
        assert events[0] == "run" and events[-1] == "result" and "partial" in events


@pytest.mark.parametrize(
    ("lang", "code"), EXAMPLES, ids=[f"{i}-{lang}" for i, (lang, _) in enumerate(EXAMPLES)]
)
def test_example_runs_verbatim(readme_server: str, lang: str, code: str) -> None:
    env = {**os.environ, "ALTO_URL": readme_server}
    cmd = ["bash", "-e", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr}"
    check_output(lang, code, proc.stdout)
    if lang == "python" and "openai" in code:
        assert "[claims claims.1]" in proc.stderr  # intermediate partials came through
        assert "claim_level_factuality" in proc.stdout
    if lang == "python" and "httpx_sse" in code:
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("run ") and lines[-1].startswith("result ")


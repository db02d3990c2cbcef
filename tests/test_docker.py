"""The docker-compose deployment, checked without a Docker engine.

There is no Docker engine (nor the compose plugin) on the CI machine, so `docker compose config`
and `docker compose up` cannot run here. What is checked instead:

* the compose files parse (PyYAML) and have the expected services: a SuperLink in process
  isolation, its ServerApp SuperExec, N SuperNodes in process isolation each with its own
  ClientApp SuperExec, partition ids 0..N-1; TLS and SuperNode auth flags on; volumes for data,
  certificates, results and caches; the GPU override reserves one distinct GPU per ClientApp;
* every flower-*/flwr flag used in the compose files, in scripts/local_deployment.py and in the
  commands of docs/deployment.md exists in the installed CLI's --help;
* the flwr image tags and Dockerfile FLWR_VERSION equal the installed flwr and lie in the range
  pinned in pyproject.toml; the Dockerfiles COPY only files that exist;
* (slow) the compose topology itself -- the containers' exact commands, with host names, ports
  and mount paths mapped to 127.0.0.1 and temp folders -- runs as plain processes and completes
  a tiny run: TLS on the SuperLink and on each SuperNode's Runtime API, SuperNode auth, the
  SuperExec shared secret, process isolation.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
FLWR_VERSION_DEFAULT = re.compile(r"\$\{FLWR_VERSION:-([^}]+)\}")

sys.path.insert(0, str(ROOT / "scripts"))
import local_deployment as ld  # noqa: E402

# Which program each service runs: the image's entrypoint.
PROGRAM = {"superlink": "flower-superlink", "supernode": "flower-supernode", "superexec": "flower-superexec"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def program_of(name: str, service: dict) -> str:
    if "entrypoint" in service:
        return service["entrypoint"][0]
    if "build" in service:  # our SuperExec images (ENTRYPOINT flower-superexec)
        return "flower-superexec"
    image = service["image"].split(":")[0]
    return PROGRAM[image.removeprefix("flwr/")]


def arg(command: list[str], flag: str) -> str | None:
    """The value after `flag` in a command list (None when absent)."""
    return command[command.index(flag) + 1] if flag in command else None


@pytest.fixture(scope="module")
def compose() -> dict:
    return load(COMPOSE)


def node_indices(services: dict) -> list[int]:
    return sorted(int(n.rsplit("-", 1)[1]) for n in services if re.fullmatch(r"supernode-\d+", n))


# --------------------------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------------------------
def test_compose_has_superlink_serverapp_and_a_superexec_per_supernode(compose):
    services = compose["services"]
    nodes = node_indices(services)
    assert len(nodes) >= 2 and nodes == list(range(1, len(nodes) + 1))
    expected = {"superlink", "superexec-serverapp"}
    expected |= {f"supernode-{i}" for i in nodes} | {f"superexec-clientapp-{i}" for i in nodes}
    assert set(services) == expected

    link = services["superlink"]["command"]
    assert arg(link, "--isolation") == "process" and arg(link, "--host") == "0.0.0.0"
    link_port = arg(link, "--port")
    assert arg(services["superexec-serverapp"]["command"], "--runtime-api-address") == f"superlink:{link_port}"

    for i in nodes:
        node = services[f"supernode-{i}"]["command"]
        assert arg(node, "--isolation") == "process"
        assert arg(node, "--superlink") == f"superlink:{link_port}"
        assert arg(node, "--node-config") == f"partition-id={i - 1} num-partitions={len(nodes)}"
        assert arg(node, "--host") == "0.0.0.0"
        executor = services[f"superexec-clientapp-{i}"]["command"]
        assert arg(executor, "--runtime-api-address") == f"supernode-{i}:{arg(node, '--port')}"
        assert f"supernode-{i}" in services[f"superexec-clientapp-{i}"]["depends_on"]
        # ClientApps forked warm (asyncfl/launcher.py); the ServerApp's SuperExec is Flower's own
        assert program_of(f"superexec-clientapp-{i}", services[f"superexec-clientapp-{i}"]) == "asyncfl-superexec"
    assert program_of("superexec-serverapp", services["superexec-serverapp"]) == "flower-superexec"


def test_tls_node_auth_and_superexec_secret_are_on(compose):
    services = compose["services"]
    for name, svc in services.items():
        assert "--insecure" not in svc["command"], f"{name} runs without TLS"
        secret = arg(svc["command"], "--superexec-auth-secret-file")
        assert secret == "/certs/superexec.secret", f"{name}: SuperExec secret missing"

    link = services["superlink"]["command"]
    assert arg(link, "--ssl-ca-certfile") == "/certs/ca.crt"
    assert arg(link, "--ssl-certfile") == "/certs/server.pem"
    assert arg(link, "--ssl-keyfile") == "/certs/server.key"
    assert "--enable-supernode-auth" in link
    assert "--disable-runtime-dependency-installation" in link
    for i in node_indices(services):
        node = services[f"supernode-{i}"]["command"]
        assert arg(node, "--root-certificates") == "/certs/ca.crt"
        assert arg(node, "--auth-supernode-private-key") == f"/certs/keys/node-{i}"
        # The Runtime API that the ClientApp SuperExec dials is TLS too.
        assert arg(node, "--ssl-certfile") and arg(node, "--ssl-keyfile") and arg(node, "--ssl-ca-certfile")
    for name in services:
        if name.startswith("superexec-"):
            assert arg(services[name]["command"], "--root-certificates") == "/certs/ca.crt"
    # The SuperLink port is published on loopback only (the Control API has no user auth).
    assert all(p.startswith("127.0.0.1:") for p in services["superlink"]["ports"])


def test_volumes_for_certs_data_results_and_caches(compose):
    services = compose["services"]

    def mounts(name: str) -> dict[str, str]:
        out = {}
        for v in services[name].get("volumes", []):
            v = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", v)  # ${VAR:-default} -> default
            parts = v.split(":")
            out[parts[1]] = ":".join([parts[0], *parts[2:]])
        return out

    for name in services:
        assert mounts(name)["/certs"].endswith(":ro"), f"{name}: certs must be mounted read-only"
    server = mounts("superexec-serverapp")
    assert "/data" in server and "/results" in server and not server["/results"].endswith(":ro")
    for i in node_indices(services):
        client = mounts(f"superexec-clientapp-{i}")
        assert client["/data"].endswith(":ro")
        assert client["/cache"].startswith(f"node-{i}-cache")  # node-local model/data cache
        assert f"node-{i}-cache" in compose["volumes"]


def test_gpu_override_gives_each_clientapp_its_own_gpu(compose):
    gpu = load(COMPOSE_GPU)["services"]
    assert set(gpu) <= set(compose["services"])
    assert {n for n in gpu} == {n for n in compose["services"] if n.startswith("superexec-clientapp-")}
    devices = []
    for name, svc in gpu.items():
        assert (ROOT / svc["build"]["dockerfile"]).is_file()
        (res,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert res["driver"] == "nvidia" and "gpu" in res["capabilities"]
        devices += res["device_ids"]
    assert len(devices) == len(set(devices)) == len(gpu)


# --------------------------------------------------------------------------------------------
# Versions and Dockerfiles
# --------------------------------------------------------------------------------------------
def test_image_versions_match_the_pinned_flwr(compose):
    import flwr

    installed = Version(flwr.__version__)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (flwr_dep,) = [d for d in deps if re.match(r"flwr(\[|[<>=!~ ]|$)", d)]
    pinned = SpecifierSet(re.sub(r"^flwr(\[[^\]]*\])?", "", flwr_dep))

    tags = set()
    for path in (COMPOSE, COMPOSE_GPU):
        tags |= set(FLWR_VERSION_DEFAULT.findall(path.read_text()))
    for path in DOCKERFILES:
        text = path.read_text()
        tags |= set(re.findall(r"^ARG FLWR_VERSION=(\S+)$", text, re.M))
        assert re.search(r"^FROM flwr/superexec:\$\{FLWR_VERSION\}$", text, re.M), path
    for svc in compose["services"].values():
        if "image" in svc and svc["image"].startswith("flwr/"):
            assert FLWR_VERSION_DEFAULT.search(svc["image"]), svc["image"]
    assert len(tags) == 1, f"flwr versions differ across docker files: {tags}"
    (tag,) = tags
    assert Version(tag) in pinned, f"image tag {tag} outside pyproject's {flwr_dep}"
    assert Version(tag) == installed, f"image tag {tag} != installed flwr {installed}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_files_kept_by_its_dockerignore(dockerfile):
    assert len(DOCKERFILES) >= 2  # CPU and GPU
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    assert sources
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"
        assert f"!{src.rstrip('/')}" in ignore or f"!{src.rstrip('/')}/" in ignore, src
    assert "ENTRYPOINT [\"flower-superexec\"]" in dockerfile.read_text()


# --------------------------------------------------------------------------------------------
# Every flag exists in the installed CLIs
# --------------------------------------------------------------------------------------------
@functools.cache
def help_text(*command: str) -> str:
    res = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"})
    assert res.returncode == 0, f"{command} --help failed: {res.stderr}"
    return res.stdout + res.stderr


def flags_in(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


FLWR_SUBCOMMANDS = {"run", "ls", "list", "stop", "log", "supernode", "register", "unregister",
                    "build", "install", "pull", "login", "federation", "config", "app", "new"}


def assert_flags_exist(command: list[str]) -> None:
    """`command` = program (+ flwr subcommands) + arguments; each --flag must be in --help."""
    prog, rest = [command[0]], command[1:]
    if command[0] == "flwr":  # flwr SUB [SUBSUB] ...
        while rest and rest[0] in FLWR_SUBCOMMANDS:
            prog, rest = [*prog, rest[0]], rest[1:]
    text = help_text(*prog)
    for flag in flags_in(rest):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
            f"`{' '.join(prog)}` has no {flag} (installed flwr)")


def compose_commands() -> list[list[str]]:
    out = []
    for path in (COMPOSE,):
        for name, svc in load(path)["services"].items():
            out.append([program_of(name, svc), *svc["command"]])
    return out


def script_commands(tmp_path: Path) -> list[list[str]]:
    for insecure in (False, True):
        for executor in ld.EXECUTORS:
            dep = ld.Deployment(tmp_path, 2, insecure=insecure, superlink_port=9100, executor=executor)
            yield dep.superlink_cmd()
            yield dep.supernode_cmd(1, 0)
            if dep.process_isolation:
                yield dep.superexec_cmd(1)
    yield ["flwr", "supernode", "register", "k.pub", ld.CONNECTION, "--format", "json"]
    yield ["flwr", "supernode", "ls", ld.CONNECTION, "--format", "json"]
    yield ["flwr", "ls", ld.CONNECTION, "--run-id", "1", "--format", "json"]
    yield ["flwr", "run", ".", ld.CONNECTION, "--stream", "--run-config", "x=1"]
    yield ["flwr", "stop", "1", ld.CONNECTION]


def docs_commands() -> list[list[str]]:
    """flower-*/flwr command lines in docs/deployment.md code blocks (continuations joined)."""
    blocks, lang, buf = [], None, []
    for line in (ROOT / "docs" / "deployment.md").read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, buf = line[3:].strip(), []
            else:
                if lang in ("bash", "sh", "console"):
                    blocks.append("\n".join(buf))
                lang = None
        elif lang is not None:
            buf.append(line)
    out = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            starts = [k for k, t in enumerate(tokens)
                      if t in ("flwr", "asyncfl-superexec") or t.startswith("flower-")]
            if starts:
                out.append(tokens[starts[0]:])
    return out


def test_every_flag_in_compose_exists_in_the_installed_cli():
    for command in compose_commands():
        assert_flags_exist(command)


def test_every_flag_in_the_local_deployment_script_exists(tmp_path):
    for command in script_commands(tmp_path):
        assert_flags_exist(command)


def test_every_flag_in_the_deployment_docs_exists():
    commands = docs_commands()
    programs = {c[0] for c in commands}
    assert {"flower-superlink", "flower-supernode", "asyncfl-superexec", "flwr"} <= programs, programs
    for command in commands:
        assert_flags_exist(command)


def test_docker_compose_config_when_available():
    """`docker compose config` validates the file; there is no compose plugin on CI."""
    if shutil.which("docker") is None or subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` here (no Docker engine/compose plugin on CI); "
                    "the structure tests above stand in for it")
    res = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "-f", str(COMPOSE_GPU),
                          "config", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


# --------------------------------------------------------------------------------------------
# The compose topology as plain processes
# --------------------------------------------------------------------------------------------
def localize(command: list[str], mapping: dict[str, str]) -> list[str]:
    """Map container host names, ports and mount paths in a command to local ones."""
    out = []
    for token in command:
        for old, new in mapping.items():
            token = token.replace(old, new)
        out.append(token)
    return out


@pytest.mark.slow
def test_compose_topology_runs_as_processes(tmp_path, compose):
    """The containers' commands, run as processes on 127.0.0.1, complete a tiny async run."""
    assert SHARED_DATA.is_dir(), f"needs {SHARED_DATA} (offline data)"
    services = compose["services"]
    nodes = node_indices(services)
    link_port = int(arg(services["superlink"]["command"], "--port"))
    base = free_port_block(len(nodes) + 1)
    # Same certificate recipe as in the compose file's header, plus the local names.
    sans = ("localhost", "127.0.0.1", "superlink", *(f"supernode-{i}" for i in nodes))
    dep = ld.Deployment(tmp_path / "work", len(nodes), superlink_port=base, node_port=base + 1,
                        sans=sans)
    results = tmp_path / "results"
    mapping = {
        f"superlink:{link_port}": f"127.0.0.1:{base}",
        "/certs/": f"{dep.certs}/",
        "0.0.0.0": "127.0.0.1",
    }
    node_ports = {}
    for i in nodes:
        port = arg(services[f"supernode-{i}"]["command"], "--port")
        mapping[f"supernode-{i}:{port}"] = f"127.0.0.1:{base + i}"
        node_ports[i] = base + i

    with dep:
        dep.prepare()

        def start(name: str):
            svc = services[name]
            cmd = localize([program_of(name, svc), *svc["command"]], mapping)
            if name.startswith("supernode-"):
                cmd[cmd.index("--port") + 1] = str(node_ports[int(name.rsplit("-", 1)[1])])
            if name == "superlink":
                cmd[cmd.index("--port") + 1] = str(base)
            env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
            return dep.spawn(name, cmd, dep.work / "flwr-home" / name, **env)

        link = start("superlink")
        dep.wait_superlink_ready(link)
        start("superexec-serverapp")
        for i in nodes:
            dep.register(i)
            dep.nodes[i] = start(f"supernode-{i}")
            start(f"superexec-clientapp-{i}")
        dep.wait_nodes_online(nodes)
        # The run config a docker user passes, with /data and /results mapped to local folders.
        run_config = (f'model-preset="tiny" tokenizer="{SHARED_DATA}/gpt2" '
                      f'data-dir="{SHARED_DATA}/wikitext-2-raw" results-dir="{results}" '
                      'run-name="compose" num-rounds=1 block-size=32 max-train-blocks=8 '
                      'eval-max-blocks=8 local-steps=2 mode="async" device="cpu" save-model=false')
        try:
            dep.run_app(ROOT, [run_config], timeout=300)
        except ld.DeploymentError:
            dep.stop_all()
            dep.print_log_tails(60)
            raise
    summary = results / "compose" / "summary.json"
    assert summary.is_file()
    events = [json.loads(l) for l in (results / "compose" / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "update" for e in events) >= len(nodes)


def free_port_block(size: int) -> int:
    """A base port with `size` consecutive free ports on 127.0.0.1."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        if all(ld.port_is_free(base + k) for k in range(size)):
            return base
    raise RuntimeError("no block of free ports found")

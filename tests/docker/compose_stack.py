"""A compose project driven from a test: the CLI (v2 plugin or v1), health waits, ports."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def compose_cli() -> list[str] | None:
    """`docker compose` (v2) when present, else `docker-compose` (v1), else None."""
    if shutil.which("docker") is None:
        return None
    v2 = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
    if v2.returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def engine_problem() -> str | None:
    """Why this machine cannot run the stack, or None when it can."""
    reason = os.environ.get("SELFLM_DOCKER_UNAVAILABLE")
    if reason:
        return reason
    if shutil.which("docker") is None:
        return "no docker CLI (scripts/ci-docker.sh installs docker.io)"
    info = subprocess.run(
        ["docker", "info", "--format", "{{.ServerVersion}}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if info.returncode != 0:
        return f"the Docker engine is not reachable: {info.stderr.strip()[-300:]}"
    if compose_cli() is None:
        return "no Compose CLI (docker compose or docker-compose)"
    return None


def docker(*args: str, check: bool = True, timeout: float = 600) -> str:
    r = subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {r.returncode}\n{r.stderr[-3000:]}")
    return r.stdout


def inspect(container: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(docker("inspect", container))
    return data[0]


def free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1 (the api's published range)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no two consecutive free ports")


@dataclass
class Stack:
    """One compose project (`-p name`), its env file and compose files."""

    name: str
    env_file: Path
    files: list[str]
    cli: list[str]
    log: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        # The env file decides interpolation: drop what this process would override it with.
        keys = {
            line.split("=", 1)[0]
            for line in self.env_file.read_text().splitlines()
            if "=" in line and not line.startswith("#")
        }
        return {
            k: v
            for k, v in os.environ.items()
            if k not in keys and not k.startswith("COMPOSE_")
        }

    def run(self, *args: str, timeout: float = 1800, check: bool = True) -> str:
        cmd = [*self.cli, "-p", self.name, "--env-file", str(self.env_file)]
        for f in self.files:
            cmd += ["-f", f]
        cmd += list(args)
        started = time.monotonic()
        r = subprocess.run(
            cmd,
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
        self.log.append(f"$ {' '.join(cmd[len(self.cli) :])}  ({time.monotonic() - started:.0f} s)")
        if check and r.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} -> {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        return r.stdout

    def containers(self, service: str | None = None) -> list[str]:
        """Ids of this project's containers (all states), optionally of one service."""
        filters = ["--filter", f"label=com.docker.compose.project={self.name}"]
        if service:
            filters += ["--filter", f"label=com.docker.compose.service={service}"]
        out = docker("ps", "-a", "-q", "--no-trunc", *filters)
        return out.split()

    def wait_healthy(self, ids: list[str], timeout: float = 900) -> None:
        """Every container with a healthcheck healthy, every one without exited 0."""
        deadline = time.monotonic() + timeout
        while True:
            pending = []
            for cid in ids:
                state = inspect(cid)["State"]
                health = (state.get("Health") or {}).get("Status")
                if health == "unhealthy" or state["Status"] == "dead":
                    raise AssertionError(f"{cid[:12]} {state}\n{self.logs(cid)}")
                if state["Status"] == "exited":
                    if health is not None or state["ExitCode"] != 0:
                        raise AssertionError(f"{cid[:12]} exited {state}\n{self.logs(cid)}")
                    continue
                if health != "healthy":
                    pending.append(cid)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise AssertionError(
                    "not healthy: " + ", ".join(self.service_of(c) for c in pending)
                )
            time.sleep(2)

    def service_of(self, cid: str) -> str:
        return str(inspect(cid)["Config"]["Labels"]["com.docker.compose.service"])

    def logs(self, cid: str, tail: int = 80) -> str:
        r = subprocess.run(
            ["docker", "logs", "--tail", str(tail), cid],
            capture_output=True,
            text=True,
            check=False,
        )
        return r.stdout + r.stderr

    def api_urls(self) -> list[str]:
        """http://127.0.0.1:<port> of each running api replica (its published port)."""
        urls = []
        for cid in self.containers("api"):
            info = inspect(cid)
            if info["State"]["Status"] != "running":
                continue
            bindings = info["NetworkSettings"]["Ports"]["8080/tcp"]
            assert bindings, f"api {cid[:12]} publishes no port"
            assert all(b["HostIp"] == "127.0.0.1" for b in bindings), bindings
            urls.append(f"http://127.0.0.1:{bindings[0]['HostPort']}")
        return urls

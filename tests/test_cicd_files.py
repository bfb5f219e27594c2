"""CI pipelines, Dockerfiles, the compose stack and the k8s manifests, checked against reality.

Nothing here builds an image or starts a container (no Docker engine needed). Instead every file
is parsed, the CI files are validated against their published schemas (check-jsonschema's
vendored copies, offline), and every command and flag they use is checked against the ``--help``
of the console script installed next to ``sys.executable``: an invented or misspelt flag fails.
"""

from __future__ import annotations

import ast
import functools
import ipaddress
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCKER = ROOT / "docker"
K8S = ROOT / "deploy" / "k8s"
GITHUB_CI = ROOT / ".github" / "workflows" / "ci.yml"
GITLAB_CI = ROOT / ".gitlab-ci.yml"
COMPOSE = DOCKER / "compose.yaml"
GATES = ROOT / "ci" / "gates.toml"

IMAGES = {"superlink", "gateway", "supernode", "serverapp", "serve", "mlflow"}
# The only executables an image may start (console scripts of this venv, and Debian's nginx).
KNOWN_COMMANDS = {"fedseg", "flower-superlink", "flower-supernode", "flower-superexec", "mlflow", "nginx"}
# nginx's command-line flags that take a value / that take none (`nginx -h`)
NGINX_FLAGS = {"-c": True, "-e": True, "-g": True, "-p": True, "-t": False, "-T": False, "-q": False}
GATEWAY_CONF = "/etc/fedseg-gateway/nginx.conf"
# Commands with sub-commands: how many leading words name the command.
SUBCOMMAND_DEPTH = {"fedseg": 2, "mlflow": 1}
# fedseg sub-commands that images may run: they must exist now.
IMAGE_FEDSEG_SUBCOMMANDS = {"serve", "site"}
# The one plain-HTTP hop allowed: the site runner to its SuperNode's runtime API on a shared loopback.
SITE_RUNNER = ["fedseg", "site", "runner"]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# fedseg sub-commands the CI may call besides those `fedseg --help` lists.
CI_FEDSEG_SUBCOMMANDS = {"simulate", "registry", "serve"}
# Sub-sub-commands being written now (issue #7): referenced by CI before they exist.
PENDING_FEDSEG_COMMANDS = {("registry", "promote")}
SECRET_NAME = re.compile(
    r"PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|(^|_)KEY$", re.I
)
INTERPOLATED = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(:?[-?][^}]*)?\}$")
GATE_KEYS = {"min_worst_site_dice", "max_worst_site_dice_drop", "max_mean_dice_drop", "max_epsilon", "require_manifests"}


# ----------------------------------------------------------------------------- real CLIs


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        NO_COLOR="1",
        COLUMNS="200",
        TERM="dumb",
    )
    return env


@functools.lru_cache(maxsize=None)
def cli_help(*words: str) -> tuple[int, str]:
    """``<venv>/bin/WORDS[0] WORDS[1:] --help``: exit code and output."""
    exe = BIN / words[0]
    if not exe.exists():
        return 127, f"{exe} does not exist"
    proc = subprocess.run(
        [str(exe), *words[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(),
        cwd=ROOT,
    )
    return proc.returncode, proc.stdout + proc.stderr


# fedseg commands the CI files use: their help comes from one process (the CLI's click group
# imported once), which keeps this module fast; images' commands run their real console script.
FEDSEG_CI_HELP = [
    (),
    ("simulate",),
    ("simulate", "sites"),
    ("simulate", "run"),
    ("registry",),
    ("registry", "list"),
    ("registry", "promote"),
    ("registry", "show"),
    ("registry", "dossier"),
]
_FEDSEG_BATCH = """
import contextlib, io, json, sys
import click
from fedseg.cli import main
out = {}
for args in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            rc = main.main(args=[*args, "--help"], prog_name="fedseg", standalone_mode=False)
            rc = rc if isinstance(rc, int) else 0
        except click.ClickException as exc:
            exc.show()
            rc = exc.exit_code
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
    out[" ".join(args)] = [rc, buf.getvalue()]
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def fedseg_batch_help() -> dict[tuple[str, ...], tuple[int, str]]:
    import json

    proc = subprocess.run(
        [sys.executable, "-c", _FEDSEG_BATCH, json.dumps([list(w) for w in FEDSEG_CI_HELP])],
        capture_output=True, text=True, timeout=180, env=_cli_env(), cwd=ROOT,
    )
    assert proc.returncode == 0, f"fedseg CLI failed to load:\n{proc.stderr[-3000:]}"
    return {tuple(k.split()): (rc, text) for k, (rc, text) in json.loads(proc.stdout).items()}


def help_text(words: tuple[str, ...], *, real: bool) -> tuple[int, str]:
    """Help of WORDS: the real console script when REAL, else the fedseg batch when it has it."""
    if not real and words[0] == "fedseg" and words[1:] in fedseg_batch_help():
        return fedseg_batch_help()[words[1:]]
    return cli_help(*words)


@pytest.fixture(scope="module", autouse=True)
def _warm_help_cache() -> None:
    """Ask every CLI for its help once, in parallel (each costs 1-5 s of imports)."""
    real = [
        ("fedseg", "serve"),
        ("fedseg", "site", "runner"),
        ("flower-superlink",),
        ("flower-supernode",),
        ("flower-superexec",),
        ("mlflow", "server"),
    ]
    with ThreadPoolExecutor(max_workers=len(real) + 2) as pool:
        futures = [pool.submit(fedseg_batch_help), pool.submit(loaded_gates)]
        futures += [pool.submit(cli_help, *words) for words in real]
        for future in futures:
            future.result()


_OPTION_LINE = re.compile(r"^\s{1,6}(?:-\w,\s+)?(--[\w-]+)(.*)$")
_ALT_FLAG = re.compile(r"^\s*/\s*(--[\w-]+)")
_CHOICES = re.compile(r"^[ =]?(?:\{([^}]+)\}|\[([^\]]+)\])")


def help_options(words: tuple[str, ...], *, real: bool = True) -> dict[str, set[str] | None]:
    """The options a command defines (from its help's option lines), with their choices."""
    rc, text = help_text(words, real=real)
    assert rc == 0, f"`{' '.join(words)} --help` exited {rc}:\n{text[-2000:]}"
    options: dict[str, set[str] | None] = {}
    for line in text.splitlines():
        line = line.replace("│", " ")
        m = _OPTION_LINE.match(line)
        if not m:
            continue
        flag, rest = m.group(1), m.group(2)
        choices = None
        metavar = rest.strip().split(" ")[0] if rest.strip() else ""
        c = _CHOICES.match(" " + metavar) if metavar else None
        if c:
            raw = c.group(1) or c.group(2)
            sep = "," if c.group(1) else "|"
            choices = {v.strip() for v in raw.split(sep)}
        options[flag] = choices
        alt = _ALT_FLAG.match(rest)
        if alt:
            options[alt.group(1)] = None
    assert "--help" in options, f"could not read the options of `{' '.join(words)} --help`"
    return options


def fedseg_subcommands(*group: str) -> set[str]:
    """Sub-commands listed by ``fedseg [GROUP] --help`` (click's Commands: section)."""
    rc, text = help_text(("fedseg", *group), real=False)
    assert rc == 0, text
    section = text.split("Commands:", 1)[1] if "Commands:" in text else ""
    return {m.group(1) for m in re.finditer(r"^\s{2}([a-z][\w-]*)\s", section, re.M)}


def check_invocation(argv: list[str], where: str, *, image: bool) -> None:
    """ARGV must start a real console script and use only flags (and choices) it defines."""
    assert argv, f"{where}: empty command"
    exe = Path(argv[0]).name
    assert exe in KNOWN_COMMANDS, f"{where}: {argv[0]!r} is not one of {sorted(KNOWN_COMMANDS)}"
    if exe == "nginx":  # a Debian package in its image, not a console script of this venv
        rest = iter(argv[1:])
        for token in rest:
            assert token in NGINX_FLAGS, f"{where}: nginx has no flag {token!r} ({sorted(NGINX_FLAGS)})"
            if NGINX_FLAGS[token]:
                assert next(rest, None), f"{where}: nginx {token} needs a value"
        assert flag_value(argv, "-c") == GATEWAY_CONF, f"{where}: nginx must run the generated {GATEWAY_CONF}"
        return
    assert (BIN / exe).exists(), f"{where}: {exe} is not installed in {BIN}"
    words = [exe]
    rest = list(argv[1:])
    for _ in range(SUBCOMMAND_DEPTH.get(exe, 0)):
        if not rest or rest[0].startswith("-"):
            break
        words.append(rest.pop(0))
    if exe == "fedseg":
        assert len(words) > 1, f"{where}: `fedseg` without a sub-command"
        if image:
            assert words[1] in IMAGE_FEDSEG_SUBCOMMANDS, (
                f"{where}: images may only run `fedseg {sorted(IMAGE_FEDSEG_SUBCOMMANDS)}`, "
                f"not `fedseg {words[1]}`"
            )
        if len(words) == 3 and words[2] not in fedseg_subcommands(words[1]):
            # `fedseg serve` has no sub-commands: the word was a positional argument.
            group_rc, group_help = help_text(("fedseg", words[1]), real=image)
            if group_rc == 0 and "Commands:" not in group_help:
                rest.insert(0, words.pop())
            else:
                assert (words[1], words[2]) in PENDING_FEDSEG_COMMANDS and not image, (
                    f"{where}: `fedseg {words[1]} {words[2]}` does not exist"
                )
                return  # being written now: its flags cannot be checked yet
    # Images must start a real console script: run it. CI commands may use the batched help.
    rc, text = help_text(tuple(words), real=image)
    assert rc == 0, f"{where}: `{' '.join(words)} --help` exited {rc}: {text[-500:]}"
    options = help_options(tuple(words), real=image)
    for i, token in enumerate(rest):
        if not token.startswith("--"):
            continue
        flag, eq, value = token.partition("=")
        assert flag in options, (
            f"{where}: `{' '.join(words)}` has no option {flag!r} "
            f"(its options: {sorted(options)})"
        )
        choices = options[flag]
        if choices:
            value = value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
            assert value in choices, f"{where}: {flag} {value!r} is not one of {sorted(choices)}"


def plain_http_allowed(argv: list[str]) -> bool:
    """``--insecure`` is allowed only for the site runner dialing a loopback runtime API whose
    tasks only the holder of the SuperExec secret can take."""
    address = flag_value(argv, "--runtime-api-address") or ""
    return (argv[:3] == SITE_RUNNER and address.rsplit(":", 1)[0].strip("[]") in LOOPBACK
            and bool(flag_value(argv, "--superexec-auth-secret-file")))


def flag_value(argv: list[str], flag: str) -> str | None:
    for i, token in enumerate(argv):
        if token == flag and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


# ----------------------------------------------------------------------------- Dockerfiles


def dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("*.Dockerfile"))


def parse_dockerfile(path: Path) -> DockerfileParser:
    return DockerfileParser(path=str(path), cache_content=True)


def final_stage(dfp: DockerfileParser) -> list[dict]:
    structure = dfp.structure
    starts = [i for i, ins in enumerate(structure) if ins["instruction"] == "FROM"]
    assert starts, "no FROM"
    return structure[starts[-1] :]


def exec_form(instruction: dict, where: str) -> list[str]:
    value = instruction["value"].strip()
    assert value.startswith("["), f"{where}: {instruction['instruction']} must use the exec (JSON) form"
    parsed = yaml.safe_load(value)
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), where
    return parsed


def image_command(path: Path) -> tuple[list[str], list[str]]:
    """ENTRYPOINT and CMD of a Dockerfile's final stage."""
    entrypoint: list[str] = []
    cmd: list[str] = []
    for ins in final_stage(parse_dockerfile(path)):
        if ins["instruction"] == "ENTRYPOINT":
            entrypoint = exec_form(ins, f"{path.name} ENTRYPOINT")
        elif ins["instruction"] == "CMD":
            cmd = exec_form(ins, f"{path.name} CMD")
    return entrypoint, cmd


def env_pairs(value: str) -> dict[str, str]:
    """ENV/ARG ``a=1 b="x y"`` (or legacy ``ENV a 1``) as a dict."""
    tokens = shlex.split(value.replace("\\\n", " "))
    if tokens and "=" not in tokens[0]:
        return {tokens[0]: " ".join(tokens[1:])}
    return dict(t.split("=", 1) if "=" in t else (t, "") for t in tokens)


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pinned(dist: str) -> str:
    for dep in pyproject()["project"]["dependencies"]:
        m = re.match(rf"^{re.escape(dist)}(\[[^\]]*\])?==([\w.]+)$", dep.replace(" ", ""))
        if m:
            return m.group(2)
    raise AssertionError(f"{dist} is not pinned with == in pyproject.toml")


def makefile_torch_spec() -> str:
    m = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert m, "Makefile has no TORCH_SPEC ?= default"
    return m.group(1)


def test_the_six_images_have_dockerfiles() -> None:
    assert {p.name.removesuffix(".Dockerfile") for p in dockerfiles()} == IMAGES


@pytest.mark.parametrize("path", dockerfiles(), ids=lambda p: p.name)
def test_dockerfile(path: Path) -> None:
    dfp = parse_dockerfile(path)
    structure = dfp.structure
    stages: set[str] = set()
    for ins in structure:
        if ins["instruction"] != "FROM":
            continue
        words = ins["value"].split()
        words = [w for w in words if not w.startswith("--platform")]
        ref = words[0]
        if len(words) >= 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if ref in stages:
            continue
        repo, _, tag = ref.rpartition(":")
        assert "@sha256:" in ref or (repo and tag and tag != "latest" and "/" not in tag), (
            f"{path.name}: base image {ref!r} is not pinned to a tag (or digest)"
        )
        assert ref.startswith("python:3.11-slim"), f"{path.name}: base {ref!r} is not python:3.11-slim"

    final = final_stage(dfp)
    users = [ins["value"].strip() for ins in final if ins["instruction"] == "USER"]
    assert users, f"{path.name}: the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        f"{path.name}: USER {users[-1]!r} must be a numeric non-root uid (k8s runAsNonRoot checks it)"
    )

    # No secrets baked in: no ENV/ARG with a secret-looking name and a value, no key material.
    for ins in structure:
        if ins["instruction"] in ("ENV", "ARG"):
            for name, value in env_pairs(ins["value"]).items():
                assert not (SECRET_NAME.search(name) and value), (
                    f"{path.name} line {ins['startline'] + 1}: {ins['instruction']} {name} "
                    "looks like a secret: mount it at run time"
                )
        if ins["instruction"] in ("COPY", "ADD"):
            assert not re.search(r"\.(key|pem|crt|secret)\b|certs/|secrets/", ins["value"]), (
                f"{path.name}: {ins['instruction']} {ins['value']} copies key material into the image"
            )
    assert "-----BEGIN" not in path.read_text(), f"{path.name} contains key material"

    entrypoint, cmd = image_command(path)
    argv = entrypoint + cmd
    check_invocation(argv, path.name, image=True)

    envs = {}
    for ins in final:
        if ins["instruction"] == "ENV":
            envs.update(env_pairs(ins["value"]))
    if Path(argv[0]).name.startswith("flower-"):
        assert envs.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1", (
            f"{path.name}: Flower images must set FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"
        )


@pytest.mark.parametrize("name", ["serve", "supernode", "serverapp"])
def test_fedseg_images_install_torch_first_then_the_project(name: str) -> None:
    dfp = parse_dockerfile(DOCKER / f"{name}.Dockerfile")
    args: dict[str, str] = {}
    runs: list[str] = []
    for ins in dfp.structure:
        if ins["instruction"] == "ARG":
            args.update({k: v for k, v in env_pairs(ins["value"]).items()})
        if ins["instruction"] == "RUN" and "pip install" in ins["value"]:
            runs.append(ins["value"])
    assert args.get("TORCH_SPEC") == makefile_torch_spec(), (
        f"{name}: ARG TORCH_SPEC default must be the Makefile's {makefile_torch_spec()!r}"
    )
    torch_at = next(i for i, r in enumerate(runs) if "${TORCH_SPEC}" in r or "$TORCH_SPEC" in r)
    project_at = next(i for i, r in enumerate(runs) if re.search(r"pip install (\.|/src)(\s|$)", r))
    assert torch_at < project_at, f"{name}: torch must be installed before the project"


@pytest.mark.parametrize(("name", "dist"), [("superlink", "flwr"), ("mlflow", "mlflow")])
def test_lean_images_pin_the_projects_versions(name: str, dist: str) -> None:
    text = (DOCKER / f"{name}.Dockerfile").read_text()
    found = set(re.findall(rf"\b{dist}(?:\[[\w,]+\])?==([\w.]+)", text))
    assert found == {pinned(dist)}, f"{name}.Dockerfile pins {dist} {found}, pyproject {pinned(dist)}"


def test_serve_image_health_check_and_port() -> None:
    path = DOCKER / "serve.Dockerfile"
    final = final_stage(parse_dockerfile(path))
    entrypoint, cmd = image_command(path)
    argv = entrypoint + cmd
    assert argv[:2] == ["fedseg", "serve"]
    port = flag_value(argv, "--port")
    assert port and flag_value(argv, "--host") == "0.0.0.0"
    assert flag_value(argv, "--model") == "models:/fedseg-unet@champion"
    health = [ins["value"] for ins in final if ins["instruction"] == "HEALTHCHECK"]
    assert health and f":{port}/health/ready" in health[-1], health
    exposed = " ".join(ins["value"] for ins in final if ins["instruction"] == "EXPOSE").split()
    assert port in [e.split("/")[0] for e in exposed]


def test_superlink_image_runs_with_tls_auth_and_a_database() -> None:
    entrypoint, cmd = image_command(DOCKER / "superlink.Dockerfile")
    argv = entrypoint + cmd
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--database"):
        assert flag_value(argv, flag), f"superlink image: {flag} missing"
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    # The ServerApp runs in the serverapp image (flower-superexec), not inside the SuperLink.
    assert flag_value(argv, "--isolation") == "process"
    assert image_command(DOCKER / "serverapp.Dockerfile")[0] == ["flower-superexec"]


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".venv", "bench/.work", ".git", "**/__pycache__"):
        assert needed in patterns, f".dockerignore must exclude {needed}"


# ----------------------------------------------------------------------------- compose


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def substitute(value: str) -> str:
    """Compose interpolation with defaults (``${X:-d}`` -> d, ``${X}``/``${X:?}`` -> X)."""
    return re.sub(
        r"\$\{([A-Za-z_]\w*)(?::?-([^}]*)|:?\?[^}]*)?\}",
        lambda m: m.group(2) if m.group(2) is not None else m.group(1),
        value,
    )


def as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def env_items(environment) -> Iterator[tuple[str, str | None]]:
    if isinstance(environment, dict):
        for k, v in environment.items():
            yield str(k), None if v is None else str(v)
    elif isinstance(environment, list):
        for item in environment:
            k, eq, v = str(item).partition("=")
            yield k, v if eq else None


def compose_services() -> dict[str, dict]:
    return load_yaml(COMPOSE)["services"]


def compose_argv(name: str, service: dict) -> list[str]:
    build = service.get("build")
    assert isinstance(build, dict) and build.get("dockerfile"), f"compose {name}: no build.dockerfile"
    dockerfile = (COMPOSE.parent / build.get("context", ".") / build["dockerfile"]).resolve()
    assert dockerfile.exists(), f"compose {name}: {dockerfile} does not exist"
    assert dockerfile.parent == DOCKER.resolve(), f"compose {name}: Dockerfile outside docker/"
    entrypoint, cmd = image_command(dockerfile)
    if "entrypoint" in service:
        entrypoint = as_list(service["entrypoint"])
    command = as_list(service["command"]) if "command" in service else cmd
    return [substitute(t) for t in entrypoint + command]


def volume_parts(volume) -> tuple[str, str]:
    """(source, target) of a compose volume, short or long syntax, interpolated."""
    if isinstance(volume, dict):
        return str(volume.get("source", "")), str(volume["target"])
    parts = substitute(volume).split(":")
    return (parts[0], parts[1]) if len(parts) > 1 else ("", parts[0])


def mounted(service: dict, path: str) -> bool:
    """Whether PATH inside the container comes from a volume, bind mount or compose secret."""
    if path.startswith("/run/secrets/"):
        names = {s if isinstance(s, str) else s.get("target", s["source"]) for s in service.get("secrets", [])}
        return path.removeprefix("/run/secrets/") in names
    for volume in service.get("volumes", []):
        target = volume_parts(volume)[1]
        if path == target or path.startswith(target.rstrip("/") + "/"):
            return True
    return False


def test_compose_validates_against_the_compose_spec() -> None:
    run_check_jsonschema("vendor.compose-spec", COMPOSE)


def test_compose_services_run_real_commands() -> None:
    services = compose_services()
    supernodes = [n for n in services if n.startswith("supernode")]
    assert {"mlflow", "superlink", "gateway", "serverapp", "serve"} <= set(services) and len(supernodes) >= 2
    for name, service in services.items():
        argv = compose_argv(name, service)
        check_invocation(argv, f"compose {name}", image=True)
        assert "--insecure" not in argv or plain_http_allowed(argv), f"compose {name}: TLS is required"
        # every file a flag names is mounted into the container
        for token in argv:
            if token.startswith(("/certs/", "/run/secrets/", "/keys/")):
                assert mounted(service, token), f"compose {name}: {token} is not mounted"


def test_compose_wires_tls_auth_and_per_site_data() -> None:
    services = compose_services()
    top_secrets = load_yaml(COMPOSE).get("secrets", {})
    link = compose_argv("superlink", services["superlink"])
    assert "--enable-supernode-auth" in link
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert flag_value(link, flag)
    database = flag_value(link, "--database")
    assert database and mounted(services["superlink"], database), "SuperLink state must be on a volume"
    port = flag_value(link, "--port")
    site_port = gateway_listeners(compose_gateway_conf())["sites"].port

    keys, data, sites = set(), set(), set()
    for name in (n for n in services if n.startswith("supernode")):
        service = services[name]
        argv = compose_argv(name, service)
        # hospitals dial the gateway's sites' listener (it lives in the superlink service's network)
        assert flag_value(argv, "--superlink") == f"superlink:{site_port}"
        assert flag_value(argv, "--root-certificates")
        keys.add(flag_value(argv, "--auth-supernode-private-key"))
        node_config = dict(
            kv.split("=", 1) for kv in shlex.split(flag_value(argv, "--node-config") or "")
        )
        assert {"data-dir", "site-name"} <= set(node_config), f"{name}: --node-config {node_config}"
        # the ClientApps run in the site's runner: the data is mounted there (and only there)
        _, runner = site_runner_of(name, services)
        assert mounted(runner, node_config["data-dir"]), f"{name}: data-dir is not mounted in its runner"
        assert not mounted(service, node_config["data-dir"]), f"{name}: the SuperNode needs no data"
        sources = [src for src, dst in map(volume_parts, runner["volumes"])
                   if dst == node_config["data-dir"]]
        data.update(sources)
        sites.add(node_config["site-name"])
        env = dict(env_items(service.get("environment")))
        assert env.get("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION") == "1", name
    n = len([s for s in services if s.startswith("supernode")])
    assert None not in keys and len(keys) == n, "each SuperNode needs its own private key"
    assert len(data) == n and len(sites) == n, "each SuperNode needs its own data and site name"

    serverapp = compose_argv("serverapp", services["serverapp"])
    assert flag_value(serverapp, "--runtime-api-address") == f"127.0.0.1:{port}"
    assert services["serverapp"].get("network_mode") == "service:superlink"
    for secret in top_secrets.values():
        assert "file" in secret or "environment" in secret, "compose secrets must not be inline"

    serve = compose_argv("serve", services["serve"])
    serve_port = flag_value(serve, "--port")
    published = [str(p).rsplit(":", 1)[-1] for p in services["serve"].get("ports", [])]
    assert serve_port in published


def site_runner_of(supernode: str, services: dict[str, dict]) -> tuple[str, dict]:
    """The one service sharing SUPERNODE's network namespace and running ``fedseg site runner``."""
    runners = [(n, s) for n, s in services.items() if s.get("network_mode") == f"service:{supernode}"
               and compose_argv(n, s)[:3] == SITE_RUNNER]
    assert len(runners) == 1, f"compose {supernode}: needs exactly one `fedseg site runner` beside it"
    return runners[0]


def secret_source(service: dict, path: str) -> str:
    """The compose secret a ``/run/secrets/...`` path comes from."""
    target = path.removeprefix("/run/secrets/")
    for secret in service.get("secrets", []):
        name, mounted_as = (secret, secret) if isinstance(secret, str) else (secret["source"],
                                                                               secret.get("target", secret["source"]))
        if mounted_as == target:
            return name
    raise AssertionError(f"{path} is not a secret of the service")


def check_runner_beside(node_argv: list[str], runner_argv: list[str], where: str) -> None:
    """SuperNode with --isolation process, its runtime API on loopback, and the runner dialing it."""
    assert flag_value(node_argv, "--isolation") == "process", f"{where}: the SuperNode must not run ClientApps"
    host = flag_value(node_argv, "--host") or "127.0.0.1"
    port = flag_value(node_argv, "--port") or "9094"
    assert host in LOOPBACK, f"{where}: the runtime API must stay on the loopback ({host})"
    assert flag_value(runner_argv, "--runtime-api-address") == f"127.0.0.1:{port}", where
    assert plain_http_allowed(runner_argv) or flag_value(runner_argv, "--root-certificates"), where
    assert flag_value(node_argv, "--superexec-auth-secret-file"), f"{where}: any process could take its tasks"
    assert flag_value(runner_argv, "--site-config") or flag_value(runner_argv, "--policy"), where


def test_compose_sites_run_the_supernode_isolated_with_its_runner_beside_it() -> None:
    services = compose_services()
    for name in (n for n in services if n.startswith("supernode")):
        runner_name, runner = site_runner_of(name, services)
        node_argv, runner_argv = compose_argv(name, services[name]), compose_argv(runner_name, runner)
        check_runner_beside(node_argv, runner_argv, f"compose {name}")
        node_secret = flag_value(node_argv, "--superexec-auth-secret-file")
        runner_secret = flag_value(runner_argv, "--superexec-auth-secret-file")
        assert secret_source(services[name], node_secret) == secret_source(runner, runner_secret), name
        for flag in ("--policy", "--audit-file"):
            assert mounted(runner, flag_value(runner_argv, flag)), f"{runner_name}: {flag} not on a volume"
        assert not any(p in runner for p in ("ports", "networks")), f"{runner_name}: only the node's loopback"


def test_compose_has_no_literal_credentials() -> None:
    text = COMPOSE.read_text()
    assert "-----BEGIN" not in text
    for name, service in compose_services().items():
        for key, value in env_items(service.get("environment")):
            if SECRET_NAME.search(key):
                # a path to a compose secret mounted into this service is fine; a value is not
                is_secret_file = bool(value) and value.startswith("/run/secrets/") and mounted(service, value)
                assert value is None or INTERPOLATED.match(value) or is_secret_file, (
                    f"compose {name}: {key} must be interpolated (${{VAR:?}}), come from env_file, "
                    "or name a mounted compose secret file"
                )
        build_args = (service.get("build") or {}).get("args") or {}
        for key, value in env_items(build_args):
            assert not (SECRET_NAME.search(key) and value), f"compose {name}: build arg {key}"


# ----------------------------------------------------------------------------- CI pipelines


def run_check_jsonschema(schema: str, path: Path) -> None:
    exe = BIN / "check-jsonschema"
    assert exe.exists(), f"{exe} missing: install the test extras (check-jsonschema)"
    proc = subprocess.run(
        [str(exe), "--builtin-schema", schema, str(path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"{path.name} fails {schema}:\n{proc.stdout}{proc.stderr}"


def github() -> dict:
    return load_yaml(GITHUB_CI)


def gitlab() -> dict:
    return load_yaml(GITLAB_CI)


def github_scripts() -> list[str]:
    return [step["run"] for job in github()["jobs"].values() for step in job.get("steps", []) if "run" in step]


def _flatten(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _flatten(item)


def gitlab_jobs() -> dict[str, dict]:
    reserved = {"stages", "variables", "workflow", "default", "include", "image", "services",
                "cache", "before_script", "after_script"}
    return {k: v for k, v in gitlab().items() if k not in reserved and isinstance(v, dict)}


def gitlab_scripts() -> list[str]:
    return [
        line
        for job in gitlab_jobs().values()
        for key in ("before_script", "script", "after_script")
        for line in _flatten(job.get(key))
    ]


_OPERATORS = {";", "&&", "||", "|", "&", "(", ")", ">", ">>", "<", "<<", "2>", "|&", ";;"}


def simple_commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a shell script (enough of sh for our CI files)."""
    for line in script.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = ""
        current: list[str] = []
        for token in lexer:
            if token in _OPERATORS or set(token) <= set(";&|()<>"):
                if current:
                    yield current
                current = []
            else:
                current.append(token)
        if current:
            yield current


def invocations(scripts: list[str], exe: str) -> list[list[str]]:
    found = []
    for script in scripts:
        for argv in simple_commands(script):
            while argv and re.match(r"^[A-Za-z_]\w*=", argv[0]):
                argv = argv[1:]
            if argv and Path(argv[0]).name == exe:
                found.append(argv)
    return found


def makefile_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-/ ]+?)\s*:(?![=:])", line)
        if m and "$" not in m.group(1):
            targets.update(m.group(1).split())
    return targets


def run_config_keys() -> set[str]:
    return set(pyproject()["tool"]["flwr"]["app"]["config"])


def check_ci_commands(scripts: list[str], where: str) -> None:
    makes = invocations(scripts, "make")
    assert makes, f"{where}: the pipeline must use the Makefile (`make test`)"
    targets = makefile_targets()
    for argv in makes:
        for word in argv[1:]:
            if not word.startswith("-") and "=" not in word:
                assert word in targets, f"{where}: `make {word}`: no such target ({sorted(targets)})"
    assert any("test" in argv[1:] for argv in makes), f"{where}: `make test` must run"

    fedsegs = invocations(scripts, "fedseg")
    allowed = CI_FEDSEG_SUBCOMMANDS | fedseg_subcommands()
    used = set()
    for argv in fedsegs:
        assert len(argv) > 1 and argv[1] in allowed, f"{where}: `fedseg {argv[1:2]}` is not a command"
        used.add(tuple(argv[1:3]))
        check_invocation(argv, where, image=False)
        for path in (flag_value(argv, "--gates"),):
            if path:
                assert (ROOT / path).is_file(), f"{where}: --gates {path} does not exist"
        run_config = flag_value(argv, "--run-config")
        if run_config:
            keys = {kv.split("=", 1)[0] for kv in shlex.split(run_config)}
            unknown = keys - run_config_keys()
            assert not unknown, f"{where}: unknown run-config keys {unknown}"
    for stage in (("simulate", "sites"), ("simulate", "run"), ("registry", "promote")):
        assert stage in used, f"{where}: the pipeline never runs `fedseg {' '.join(stage)}`"


def test_github_workflow_validates_against_its_schema() -> None:
    run_check_jsonschema("vendor.github-workflows", GITHUB_CI)


def test_gitlab_ci_validates_against_its_schema() -> None:
    run_check_jsonschema("vendor.gitlab-ci", GITLAB_CI)


def test_github_workflow_uses_the_users_commands() -> None:
    check_ci_commands(github_scripts(), "ci.yml")


def test_gitlab_ci_uses_the_users_commands() -> None:
    check_ci_commands(gitlab_scripts(), ".gitlab-ci.yml")


def test_github_workflow_stages_environment_and_images() -> None:
    wf = github()
    env = wf["env"]
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FEDSEG_HOME"]
    jobs = wf["jobs"]
    chain = ["test", "train", "gates", "register", "build"]
    for before, after in zip(chain, chain[1:]):
        needs = jobs[after].get("needs")
        assert before in ([needs] if isinstance(needs, str) else needs), f"{after} must need {before}"
    for job in jobs.values():
        for step in job.get("steps", []):
            if str(step.get("uses", "")).startswith("actions/setup-python"):
                assert str(step["with"]["python-version"]) == "3.11"
                assert step["with"].get("cache") == "pip"
    uploads = [s for s in jobs["register"]["steps"] if str(s.get("uses", "")).startswith("actions/upload-artifact")]
    assert uploads and "FEDSEG_HOME" in uploads[0]["with"]["path"]
    build = jobs["build"]
    assert "refs/heads/main" in build["if"] and "refs/tags/" in build["if"]
    assert set(build["strategy"]["matrix"]["image"]) == IMAGES
    files = [s["with"]["file"] for s in build["steps"] if str(s.get("uses", "")).startswith("docker/build-push-action")]
    assert files == ["docker/${{ matrix.image }}.Dockerfile"]


def test_gitlab_ci_stages_environment_and_images() -> None:
    ci = gitlab()
    assert ci["stages"] == ["test", "train", "gates", "register", "build"]
    variables = ci["variables"]
    assert str(variables["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"]) == "1"
    home = variables["FEDSEG_HOME"]
    jobs = gitlab_jobs()
    assert {job.get("stage") for job in jobs.values()} >= set(ci["stages"])
    home_dir = home.replace("$CI_PROJECT_DIR/", "").rstrip("/")
    assert any(p.rstrip("/") == home_dir for p in jobs["register"]["artifacts"]["paths"])
    build = jobs["build"]
    images = set(build["parallel"]["matrix"][0]["IMAGE"])
    assert images == IMAGES
    script = " ".join(_flatten(build["script"]))
    assert '-f "docker/$IMAGE.Dockerfile"' in script
    rules = " ".join(str(r.get("if", "")) for r in build["rules"])
    assert "CI_DEFAULT_BRANCH" in rules and "CI_COMMIT_TAG" in rules


@functools.lru_cache(maxsize=None)
def loaded_gates() -> tuple[int, str]:
    """ci/gates.toml through the real loader (``registry.gates.GateConfig.from_toml``)."""
    code = (
        "import json, sys; from registry.gates import GateConfig; "
        "print(json.dumps(GateConfig.from_toml(sys.argv[1]).to_dict()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(GATES)], capture_output=True, text=True, timeout=120,
        cwd=ROOT,
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_gates_file() -> None:
    raw = tomllib.loads(GATES.read_text())
    gates = raw.get("gates", raw)
    assert set(gates) <= GATE_KEYS, f"unknown gate keys {set(gates) - GATE_KEYS}"
    rc, out = loaded_gates()
    assert rc == 0, f"the registry refuses ci/gates.toml:\n{out[-2000:]}"
    assert 0.5 <= gates["min_worst_site_dice"] < 1.0
    assert 0.0 <= gates["max_mean_dice_drop"] < 1.0
    assert gates["require_manifests"] is True
    # With max_epsilon set, a version trained without DP fails (epsilon unbounded): the gate is
    # for CI only when every CI federation trains with DP (`dp=true` in its --run-config).
    if "max_epsilon" in gates:
        for scripts in (github_scripts(), gitlab_scripts()):
            for argv in invocations(scripts, "fedseg"):
                if argv[1:3] == ["simulate", "run"]:
                    config = dict(kv.split("=", 1) for kv in shlex.split(flag_value(argv, "--run-config") or ""))
                    assert config.get("dp", "false").lower() == "true", (
                        "ci/gates.toml sets max_epsilon but the CI federation trains without DP "
                        "(dp=true missing from --run-config): every run would fail the gate"
                    )


def test_ci_publishes_through_the_gates_and_never_uploads_the_signing_key() -> None:
    train = github()["jobs"]["train"]
    gated = [s for s in train["steps"] if "simulate run" in s.get("run", "")]
    assert gated and gated[0]["env"]["FEDSEG_GATES_FILE"].endswith("/ci/gates.toml")
    assert 'export FEDSEG_GATES_FILE="$CI_PROJECT_DIR/ci/gates.toml"' in gitlab_jobs()["train"]["script"]
    for job in github()["jobs"].values():
        for step in job.get("steps", []):
            if str(step.get("uses", "")).startswith("actions/upload-artifact"):
                assert "!${{ env.FEDSEG_HOME }}/keys/*signing-key*" in step["with"]["path"]
    for name, job in gitlab_jobs().items():
        if "artifacts" in job and any("fedseg-home" in p for p in job["artifacts"]["paths"]):
            assert "fedseg-home/keys/*signing-key*" in job["artifacts"].get("exclude", []), name


# ----------------------------------------------------------------------------- Kubernetes


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{path.name}: {doc}"
            assert doc["metadata"].get("name"), f"{path.name}: a {doc['kind']} without a name"
            docs.append(doc)
    assert docs, "no manifests under deploy/k8s"
    return docs


def workloads() -> list[dict]:
    return [d for d in k8s_documents() if d["kind"] in ("Deployment", "StatefulSet")]


def image_dockerfile(image: str) -> Path:
    name = image.rsplit("/", 1)[-1].split(":")[0].split("@")[0]
    path = DOCKER / f"{name}.Dockerfile"
    assert path.exists(), f"image {image!r} has no docker/{name}.Dockerfile"
    return path


def container_argv(container: dict) -> list[str]:
    entrypoint, cmd = image_command(image_dockerfile(container["image"]))
    if "command" in container:
        entrypoint = [str(x) for x in container["command"]]
    args = [str(x) for x in container["args"]] if "args" in container else cmd
    return entrypoint + args


def resolve_port(container: dict, port) -> int:
    for p in container.get("ports", []):
        if port in (p.get("name"), p["containerPort"]):
            return int(p["containerPort"])
    raise AssertionError(f"port {port!r} is not a port of container {container['name']}")


def test_k8s_workloads_run_real_commands_as_non_root() -> None:
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        assert workload["spec"]["selector"]["matchLabels"].items() <= workload["spec"]["template"]["metadata"]["labels"].items()
        for container in pod["containers"]:
            where = f"k8s {workload['metadata']['name']}/{container['name']}"
            argv = container_argv(container)
            check_invocation(argv, where, image=True)
            assert "--insecure" not in argv or plain_http_allowed(argv), where
            sc = {**pod_sc, **container.get("securityContext", {})}
            assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 1) != 0, where
            assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
            resources = container.get("resources", {})
            assert resources.get("requests") and resources.get("limits"), f"{where}: resources"
            assert not str(container["image"]).endswith(":latest"), where
            for item in container.get("env", []):
                if SECRET_NAME.search(item["name"]):
                    assert "valueFrom" in item, f"{where}: {item['name']} must come from a Secret"
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            for token in argv:
                if token.startswith(("/certs/", "/secrets/")):
                    assert any(token.startswith(m.rstrip("/") + "/") for m in mounts), (
                        f"{where}: {token} is not mounted"
                    )
    for doc in k8s_documents():
        if doc["kind"] == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                if SECRET_NAME.search(key):
                    # only a path to a file that a Secret volume provides, never the secret
                    assert secret_file_for_configmap(doc["metadata"]["name"], str(value)), (
                        f"ConfigMap {doc['metadata']['name']}: {key} belongs in a Secret "
                        "(or must name a file mounted from a Secret)"
                    )


def secret_file_for_configmap(config_map: str, path: str) -> bool:
    """Whether every container that reads CONFIG_MAP mounts PATH from a Secret volume."""
    users = 0
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        secret_volumes = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
        for container in pod["containers"]:
            refs = {s.get("configMapRef", {}).get("name") for s in container.get("envFrom", [])}
            if config_map not in refs:
                continue
            users += 1
            if not any(path.startswith(m["mountPath"].rstrip("/") + "/") and m["name"] in secret_volumes
                       for m in container.get("volumeMounts", [])):
                return False
    return users > 0


def _serving() -> tuple[dict, dict]:
    for workload in workloads():
        for container in workload["spec"]["template"]["spec"]["containers"]:
            if container_argv(container)[:2] == ["fedseg", "serve"]:
                return workload, container
    raise AssertionError("no Deployment runs `fedseg serve`")


def serving_settings_fields() -> set[str]:
    """Field names of ``serving.settings.ServingSettings`` (read from source: no heavy import)."""
    tree = ast.parse((ROOT / "serving" / "settings.py").read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "ServingSettings")
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}


def test_k8s_serving_probes_ports_and_config() -> None:
    deployment, container = _serving()
    assert deployment["kind"] == "Deployment"
    argv = container_argv(container)
    port = int(flag_value(argv, "--port") or 8080)
    assert flag_value(argv, "--host") == "0.0.0.0"
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/health/live" and ready["path"] == "/health/ready"
    assert resolve_port(container, live["port"]) == port == resolve_port(container, ready["port"])

    sources = container.get("envFrom", [])
    assert any("configMapRef" in s for s in sources) and any("secretRef" in s for s in sources)
    fields = serving_settings_fields()
    config_maps = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "ConfigMap"}
    for source in sources:
        if "configMapRef" in source:
            cm = config_maps[source["configMapRef"]["name"]]
            for key in cm["data"]:
                if key.startswith("FEDSEG_SERVE_"):
                    assert key.removeprefix("FEDSEG_SERVE_").lower() in fields, f"unknown setting {key}"

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [d for d in k8s_documents() if d["kind"] == "Service"
                and d["spec"]["selector"].items() <= labels.items()]
    assert services, "no Service selects the serving pods"
    for svc in services:
        for p in svc["spec"]["ports"]:
            assert resolve_port(container, p.get("targetPort", p["port"])) == port


def test_k8s_superlink_state_tls_and_service() -> None:
    docs = k8s_documents()
    found = False
    for workload in workloads():
        spec = workload["spec"]
        pod = spec["template"]["spec"]
        for container in pod["containers"]:
            argv = container_argv(container)
            if Path(argv[0]).name != "flower-superlink":
                continue
            found = True
            name = workload["metadata"]["name"]
            assert "--enable-supernode-auth" in argv
            mounts = container["volumeMounts"]

            def volume_of(path: str) -> str:
                best = max((m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")),
                           key=lambda m: len(m["mountPath"]), default=None)
                assert best, f"{name}: {path} is not on a mounted volume"
                return best["name"]

            claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
            claims |= {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            assert volume_of(flag_value(argv, "--database")) in claims, f"{name}: --database not on a PVC"
            secrets = {v["name"] for v in pod.get("volumes", []) if "secret" in v}
            for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
                assert volume_of(flag_value(argv, flag)) in secrets, f"{name}: {flag} not from a Secret"
            # on the pod's loopback: no port of its own, probed from inside its container
            assert ipaddress.ip_address(flag_value(argv, "--host") or "0.0.0.0").is_loopback, name
            assert not container.get("ports"), f"{name}: the SuperLink container must expose no port"
            probe = container["livenessProbe"]["exec"]["command"]
            assert f"('127.0.0.1', {flag_value(argv, '--port')})" in " ".join(probe), probe
    assert found, "no workload runs flower-superlink"


def test_k8s_site_pod_runs_the_supernode_isolated_with_its_runner() -> None:
    found = False
    for workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        argvs = {c["name"]: container_argv(c) for c in pod["containers"]}
        nodes = [n for n, argv in argvs.items() if Path(argv[0]).name == "flower-supernode"]
        if not nodes:
            continue
        found = True
        runners = [n for n, argv in argvs.items() if argv[:3] == SITE_RUNNER]
        assert len(nodes) == 1 and len(runners) == 1, f"{workload['metadata']['name']}: one node, one runner"
        node_argv, runner_argv = argvs[nodes[0]], argvs[runners[0]]
        where = f"k8s {workload['metadata']['name']}"
        check_runner_beside(node_argv, runner_argv, where)
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        containers = {c["name"]: c for c in pod["containers"]}

        def volume_of(container: str, path: str) -> dict:
            mounts = [m for m in containers[container].get("volumeMounts", [])
                      if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
            assert mounts, f"{where}/{container}: {path} is not mounted"
            return volumes[max(mounts, key=lambda m: len(m["mountPath"]))["name"]]

        secrets = [volume_of(c, flag_value(argvs[c], "--superexec-auth-secret-file")) for c in (nodes[0], runners[0])]
        assert all("secret" in v for v in secrets) and secrets[0] == secrets[1], f"{where}: one shared Secret"
        site_config = flag_value(runner_argv, "--site-config")
        assert site_config and "configMap" in volume_of(runners[0], site_config), where
        node_config = dict(kv.split("=", 1) for kv in shlex.split(flag_value(node_argv, "--node-config") or ""))
        assert node_config.get("site-config") == site_config, f"{where}: node and runner read one site.toml"
        data = [m["name"] for c in containers.values() for m in c.get("volumeMounts", [])
                if "persistentVolumeClaim" in volumes[m["name"]]]
        assert data and all(m in {x["name"] for x in containers[runners[0]]["volumeMounts"]} for m in data), (
            f"{where}: the site's data and state are mounted in the runner only")
    assert found, "no workload runs flower-supernode"


# ----------------------------------------------------------------------------- the gateway
#
# Operators, not sites, run the federation: in flwr 1.41 the SuperLink's one port serves the
# Fleet, Control and Runtime APIs, so every deployment binds it to loopback and puts the gateway
# (nginx, configured by `fedseg coordinator gateway`) on the addresses others reach.

GATEWAY_COMPOSE_CONF = DOCKER / "gateway" / "nginx.conf"


def compose_gateway_conf() -> str:
    return GATEWAY_COMPOSE_CONF.read_text()


def k8s_gateway_conf() -> str:
    (cm,) = [d for d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "fedseg-gateway"]
    return cm["data"]["nginx.conf"]


def nginx_servers(text: str) -> list[str]:
    """The ``server { ... }`` blocks of a generated configuration."""
    return [block for block in text.split("\n    server {")[1:]]


def gateway_listeners(text: str):  # noqa: ANN201
    """The sites' and operators' listeners and the SuperLink upstream of a generated config."""
    from server.gateway import parse_listener

    listeners = {}
    for block in nginx_servers(text):
        (listen,) = re.findall(r"^\s+listen (\S+) ssl;$", block, re.M)
        role = "operators" if "ssl_verify_client on;" in block else "sites"
        listeners[role] = parse_listener(listen, "listen")
    (upstream,) = re.findall(r"upstream superlink \{\s+server (\S+);", text)
    listeners["superlink"] = parse_listener(upstream, "upstream")
    assert set(listeners) == {"sites", "operators", "superlink"}, listeners
    return listeners


def regenerated(text: str) -> str:
    """What `fedseg coordinator gateway` writes for the command in TEXT's header."""
    from click.testing import CliRunner

    from server.cli import coordinator

    match = re.search(r"^# regenerate with:\n#   (fedseg coordinator gateway .+)$", text, re.M)
    assert match, "the gateway configuration does not say which command generated it"
    argv = shlex.split(match.group(1))[3:]
    result = CliRunner().invoke(coordinator, ["gateway", *argv])
    assert result.exit_code == 0, result.output
    return result.output


def check_gateway_conf(text: str, where: str) -> None:
    """Sites' server: the Fleet API only; operators' server: the Control API with client
    certificates; the SuperLink on loopback; the Runtime API forwarded by neither."""
    from server.gateway import CONTROL_PATH, FLEET_PATH

    assert text == regenerated(text), f"{where} is not what `fedseg coordinator gateway` writes: regenerate it"
    listeners = gateway_listeners(text)
    assert listeners["superlink"].ip.is_loopback, where
    servers = {("operators" if "ssl_verify_client on;" in b else "sites"): b for b in nginx_servers(text)}
    locations = {role: re.findall(r"^\s+location (.+?) \{$", block, re.M) for role, block in servers.items()}
    assert locations["sites"] == [f'~ "{FLEET_PATH}"', "= /health", "/"], (where, locations["sites"])
    assert locations["operators"] == [f'~ "{CONTROL_PATH}"', "= /health", "@no_operator_certificate", "/"], where
    assert "/v1/control" not in servers["sites"] and "/v1/runtime" not in text, where
    assert re.search(r'^\s+ssl_client_certificate "\S+";$', servers["operators"], re.M), where


def test_the_gateway_configurations_are_generated_and_keep_control_off_the_sites_address() -> None:
    check_gateway_conf(compose_gateway_conf(), "docker/gateway/nginx.conf")
    check_gateway_conf(k8s_gateway_conf(), "deploy/k8s ConfigMap fedseg-gateway")


def test_compose_exposes_the_gateway_never_the_superlink() -> None:
    services = compose_services()
    link = compose_argv("superlink", services["superlink"])
    assert ipaddress.ip_address(flag_value(link, "--host") or "0.0.0.0").is_loopback, "SuperLink --host"
    listeners = gateway_listeners(compose_gateway_conf())
    assert str(listeners["superlink"]) == f"{flag_value(link, '--host')}:{flag_value(link, '--port')}"
    gateway = services["gateway"]
    assert gateway.get("network_mode") == "service:superlink" and "ports" not in gateway
    assert compose_argv("gateway", gateway)[:3] == ["nginx", "-c", GATEWAY_CONF]
    mounts = {dst: src for src, dst in map(volume_parts, gateway["volumes"])}
    assert (COMPOSE.parent / mounts[GATEWAY_CONF]).resolve() == GATEWAY_COMPOSE_CONF.resolve()
    for path in re.findall(r'"(/(?:certs|run/secrets)/[^"]+)"', compose_gateway_conf()):
        assert mounted(gateway, path), f"compose gateway: {path} is not mounted"
    # the namespace publishes the gateway's two listeners, never the SuperLink's port
    published = {str(p).rsplit(":", 1)[-1] for p in services["superlink"].get("ports", [])}
    assert published == {str(listeners["sites"].port), str(listeners["operators"].port)}, published
    # the operators' address is published on loopback unless the operator chooses a management IP
    operator_publish = next(str(p) for p in services["superlink"]["ports"]
                            if str(p).endswith(f":{listeners['operators'].port}"))
    assert substitute(operator_publish).startswith("127.0.0.1:"), operator_publish


def test_k8s_services_reach_the_gateway_never_the_superlink() -> None:
    (workload,) = [w for w in workloads()
                   if any(container_argv(c)[0] == "flower-superlink" for c in w["spec"]["template"]["spec"]["containers"])]
    pod = workload["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    link = container_argv(containers["superlink"])
    gateway = containers["gateway"]
    assert container_argv(gateway)[:3] == ["nginx", "-c", GATEWAY_CONF]
    (mount,) = [m for m in gateway["volumeMounts"] if m["mountPath"] == str(Path(GATEWAY_CONF).parent)]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "fedseg-gateway"
    listeners = gateway_listeners(k8s_gateway_conf())
    assert str(listeners["superlink"]) == f"{flag_value(link, '--host')}:{flag_value(link, '--port')}"
    assert {resolve_port(gateway, "fleet"), resolve_port(gateway, "operator")} == {
        listeners["sites"].port, listeners["operators"].port}
    # the ServerApp process runs in the same pod and dials the SuperLink's loopback address
    (serverapp,) = [c for c in containers.values() if container_argv(c)[0] == "flower-superexec"]
    assert flag_value(container_argv(serverapp), "--runtime-api-address") == str(listeners["superlink"])
    labels = workload["spec"]["template"]["metadata"]["labels"]
    services = {d["metadata"]["name"]: d for d in k8s_documents() if d["kind"] == "Service"
                and d["spec"]["selector"].items() <= labels.items()}
    assert services, "no Service selects the coordinator pod"
    for name, svc in services.items():
        for port in svc["spec"]["ports"]:
            target = resolve_port(gateway, port.get("targetPort", port["port"]))
            assert target in (listeners["sites"].port, listeners["operators"].port), name
    public = [s for s in services.values() if s["spec"].get("type") == "LoadBalancer"]
    assert public and all(resolve_port(gateway, p["targetPort"]) == listeners["sites"].port
                          for s in public for p in s["spec"]["ports"]), "only the sites' listener may be public"
    ready = gateway["readinessProbe"]["httpGet"]
    assert ready["path"] == "/health" and ready["scheme"] == "HTTPS"


def test_images_bind_the_superlink_to_loopback() -> None:
    link = sum(image_command(DOCKER / "superlink.Dockerfile"), [])
    assert ipaddress.ip_address(flag_value(link, "--host") or "0.0.0.0").is_loopback
    superexec = sum(image_command(DOCKER / "serverapp.Dockerfile"), [])
    assert flag_value(superexec, "--runtime-api-address") == f"127.0.0.1:{flag_value(link, '--port')}"
    exposed = [ins for ins in final_stage(parse_dockerfile(DOCKER / "superlink.Dockerfile"))
               if ins["instruction"] == "EXPOSE"]
    assert not exposed, "the SuperLink image must expose no port: the gateway image does"
    assert sum(image_command(DOCKER / "gateway.Dockerfile"), [])[:3] == ["nginx", "-c", GATEWAY_CONF]


@pytest.mark.adversarial
def test_the_coordinators_deployments_refuse_runs_without_enrolled_sites() -> None:
    """Shipped coordinators fail closed on site identity (issue 15, item 5): the ServerApp requires
    enrolment and reads the enrolment directory from a mount, so no run trusts self-reported names."""
    serverapp = compose_services()["serverapp"]
    env = dict(env_items(serverapp.get("environment")))
    assert env.get("FEDSEG_REQUIRE_ENROLMENT") == "1", "compose serverapp: FEDSEG_REQUIRE_ENROLMENT not 1"
    assert env.get("FEDSEG_ENROLMENT_DIR"), "compose serverapp: no FEDSEG_ENROLMENT_DIR"
    assert mounted(serverapp, env["FEDSEG_ENROLMENT_DIR"]), "compose serverapp: enrolment dir not mounted"
    config = next(d for d in k8s_documents()
                  if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "fedseg-serverapp-config")
    assert config["data"].get("FEDSEG_REQUIRE_ENROLMENT") == "1", "k8s: FEDSEG_REQUIRE_ENROLMENT not 1"
    containers = [c for d in k8s_documents() if d.get("kind") in {"StatefulSet", "Deployment"}
                  for c in d["spec"]["template"]["spec"]["containers"] if c["name"] == "serverapp"]
    assert containers, "k8s: no serverapp container"
    mounts = {m["mountPath"] for m in containers[0].get("volumeMounts", [])}
    assert config["data"].get("FEDSEG_ENROLMENT_DIR") in mounts, "k8s serverapp: enrolment dir not mounted"

"""The worker as users get it: a built wheel in a fresh venv, worker.py + schema.sql copied
into another project, the import graph, and the deployment recipes under deploy/.

The wheel and the venvs are built once per module (each in its own temporary
folder), from the working tree as it is, with the ordinary tools (`python -m
build`, `python -m venv`, `pip install`).
"""

from __future__ import annotations

import ast
import configparser
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import worker
import worker_cli
from conftest import HERE, wait_for

pytestmark = pytest.mark.slow

GREETING_JOBS = """
from worker import job

@job
def greet(ctx, name):
    return {"greeting": f"hello, {name}!"}
"""


def run(
    command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """A command to completion, bounded; the worker's own settings are not inherited."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
    return subprocess.run(
        command, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout, check=False
    )


def succeeded(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        found = conn.execute("SELECT type, result FROM worker_jobs WHERE status = 'succeeded' ORDER BY id").fetchall()
    conn.close()
    return found


def fresh_venv(where: Path, *requirements: str) -> Path:
    """A new venv with only ``requirements`` installed; its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=120)
    bin_dir = where / "bin"
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *requirements], check=True, timeout=300, capture_output=True)
    return bin_dir


# --- The distributions ---------------------------------------------------------------


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sdist, and the wheel built from that sdist (as `python -m build` does)."""
    out = tmp_path_factory.mktemp("dist")
    built = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(HERE)], capture_output=True, text=True, timeout=300
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


def wheel_of(dist: Path) -> Path:
    (found,) = dist.glob("*.whl")
    return found


def test_wheel_holds_four_modules_of_this_projects_names_and_both_schemas(dist: Path) -> None:
    with zipfile.ZipFile(wheel_of(dist)) as wheel:
        names = {name for name in wheel.namelist() if ".dist-info/" not in name}
        schema = wheel.read("worker_schema.sql").decode()
        postgres_schema = wheel.read("worker_schema_postgres.sql").decode()
    modules = {"worker.py", "worker_cli.py", "worker_dashboard.py", "worker_postgres.py"}
    assert names == modules | {"worker_schema.sql", "worker_schema_postgres.sql"}
    assert schema == (HERE / "schema.sql").read_text()
    assert postgres_schema == (HERE / "schema_postgres.sql").read_text()
    assert wheel_of(dist).name.startswith("rowworker-")


def test_sdist_carries_what_the_code_reads_and_builds_the_wheel(dist: Path) -> None:
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"worker.py", "worker_cli.py", "worker_dashboard.py", "schema.sql", "pyproject.toml", "LICENSE"} <= names
    assert {"worker_postgres.py", "schema_postgres.sql"} <= names
    assert {"deploy/worker.service", "deploy/Dockerfile", "test_packaging.py"} <= names


# --- Installed from the wheel into a fresh venv ------------------------------------------


@pytest.fixture(scope="module")
def installed(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel (and so croniter) installed, not editable; its bin folder."""
    return fresh_venv(tmp_path_factory.mktemp("venv") / "venv", str(wheel_of(dist)))


@pytest.fixture
def app(tmp_path: Path) -> Path:
    """An app's folder with its jobs in myjobs.py (no jobs.py, no dashboard.py)."""
    (tmp_path / "myjobs.py").write_text(GREETING_JOBS)
    return tmp_path


def test_installed_worker_enqueues_and_runs_a_job_of_the_apps_module(installed: Path, app: Path) -> None:
    worker_command = str(installed / "worker")
    enqueued = run([worker_command, "enqueue", "greet", "--data", '{"name": "wheel"}', "--jobs", "myjobs",
                    "--db", "app.db"], cwd=app)  # fmt: skip
    assert enqueued.returncode == 0, enqueued.stderr
    ran = run([worker_command, "run", "--burst", "--jobs", "myjobs", "--db", "app.db"], cwd=app)
    assert ran.returncode == 0, ran.stderr
    assert succeeded(app / "app.db") == [("greet", '{"greeting":"hello, wheel!"}')]
    assert f"jobs from {app / 'myjobs.py'}: " in ran.stderr  # the worker says where its jobs came from


def test_installed_worker_prints_the_schema(installed: Path, app: Path) -> None:
    printed = run([str(installed / "worker"), "schema"], cwd=app)
    assert printed.returncode == 0, printed.stderr
    assert "CREATE TABLE IF NOT EXISTS worker_jobs" in printed.stdout
    assert not list(app.glob("*.db"))


def test_installed_operator_commands_and_dashboard_work(installed: Path, app: Path) -> None:
    worker_command = str(installed / "worker")
    assert run([worker_command, "enqueue", "greet", "--jobs", "myjobs", "--db", "app.db", "--data", '{"name": "x"}'],
               cwd=app).returncode == 0  # fmt: skip
    state = run([worker_command, "status", "--db", "app.db"], cwd=app)
    assert state.returncode == 1, state.stderr  # no worker alive, which is what status says
    assert "(no workers)" in state.stdout
    assert run([worker_command, "jobs", "--db", "app.db"], cwd=app).returncode == 0
    assert "usage: worker dashboard" in run([worker_command, "dashboard", "--help"], cwd=app).stdout


@pytest.mark.parametrize("module", ["jobs", "dashboard"])
def test_installed_package_brings_no_generic_module(installed: Path, app: Path, module: str) -> None:
    imported = run([str(installed / "python"), "-c", f"import {module}"], cwd=app)
    assert imported.returncode == 1
    assert f"No module named '{module}'" in imported.stderr


def test_default_jobs_module_is_only_the_current_directorys(installed: Path, app: Path) -> None:
    checked = run([str(installed / "worker"), "check", "--db", "app.db"], cwd=app)
    assert checked.returncode == 2
    assert checked.stderr == f"worker: no jobs module: no jobs.py in {app} (give --jobs MODULE or set WORKER_JOBS)\n"
    (app / "jobs.py").write_text(GREETING_JOBS)
    assert run([str(installed / "worker"), "enqueue", "greet", "--db", "app.db", "--data", '{"name": "cwd"}'],
               cwd=app).returncode == 0  # fmt: skip


@pytest.mark.parametrize(
    "env", [{"DATABASE_URL": "mssql://app@db/app"}, {"WORKER_DB": "mysql://x/y"}, {"DATABASE_URL": "redis://x"}]
)
def test_a_database_url_the_worker_does_not_serve_is_exit_2_and_no_file(
    installed: Path, app: Path, env: dict[str, str]
) -> None:
    ran = run([str(installed / "worker"), "run", "--burst", "--jobs", "myjobs"], cwd=app, env=env)
    assert ran.returncode == 2
    assert ran.stderr.count("\n") == 1 and "unsupported database URL" in ran.stderr, ran.stderr
    assert not list(app.glob("*.db*"))


@pytest.mark.parametrize("url", ["postgresql://app@db/app", "postgres://app@db/app"])
def test_a_postgresql_url_without_the_extra_installed_is_exit_2_naming_it_and_no_file(
    installed: Path, app: Path, url: str
) -> None:
    ran = run([str(installed / "worker"), "run", "--burst", "--jobs", "myjobs"], cwd=app, env={"DATABASE_URL": url})
    assert ran.returncode == 2
    assert ran.stderr.count("\n") == 1 and "pip install 'rowworker[postgres]'" in ran.stderr, ran.stderr
    assert not list(app.glob("*.db*"))


def test_a_database_url_flag_is_checked_like_the_environment(tmp_path: Path) -> None:
    with pytest.raises(worker.ConfigError, match="unsupported database URL mysql://"):
        worker.Queue("mysql://app@db/app")
    assert worker.sqlite_path("sqlite:///app.db") == "app.db"
    assert worker_cli.main(["jobs", "--db", "mysql://x/y"]) == worker.EXIT_USAGE


# --- worker.py + schema.sql copied into another project --------------------------------


@pytest.fixture(scope="module")
def croniter_only(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with croniter alone: the copy unit's one dependency."""
    return fresh_venv(tmp_path_factory.mktemp("copy-venv") / "venv", "croniter")


@pytest.fixture
def copied(tmp_path: Path) -> Path:
    """An empty project folder with exactly worker.py and schema.sql copied in, and its jobs.py."""
    for name in ("worker.py", "schema.sql"):
        shutil.copy(HERE / name, tmp_path / name)
    (tmp_path / "jobs.py").write_text(GREETING_JOBS)
    return tmp_path


@pytest.mark.parametrize("how", [["worker.py"], ["-m", "worker"]])
def test_copy_unit_enqueues_and_runs(croniter_only: Path, copied: Path, how: list[str]) -> None:
    python = str(croniter_only / "python")
    enqueued = run([python, *how, "enqueue", "greet", "--data", '{"name": "copy"}'], cwd=copied)
    assert enqueued.returncode == 0, enqueued.stderr
    ran = run([python, *how, "run", "--burst"], cwd=copied)
    assert ran.returncode == 0, ran.stderr
    assert succeeded(copied / "worker.db") == [("greet", '{"greeting":"hello, copy!"}')]


def test_copy_unit_has_a_python_api(croniter_only: Path, copied: Path) -> None:
    script = "import worker; print(worker.Queue('app.db', check_types=False).enqueue('greet', {'name': 'api'}).id)"
    made = run([str(croniter_only / "python"), "-c", script], cwd=copied)
    assert made.returncode == 0, made.stderr
    assert made.stdout == "1\n"


@pytest.mark.parametrize(
    "args",
    [["status"], ["jobs"], ["dashboard"], ["run", "--processes", "2"]],
    ids=["status", "jobs", "dashboard", "processes"],
)
def test_copy_unit_names_what_needs_the_package_in_one_line(croniter_only: Path, copied: Path, args: list[str]) -> None:
    ran = run([str(croniter_only / "python"), "worker.py", *args], cwd=copied)
    assert ran.returncode == 2
    assert ran.stderr.count("\n") == 1 and "pip install rowworker" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr


def test_worker_py_without_schema_sql_is_exit_3_and_creates_no_file(croniter_only: Path, copied: Path) -> None:
    (copied / "schema.sql").unlink()
    ran = run([str(croniter_only / "python"), "worker.py", "run", "--burst"], cwd=copied)
    assert ran.returncode == 3
    assert ran.stderr == (
        f"worker: the table definition is missing: no {copied / 'schema.sql'} or {copied / 'worker_schema.sql'}"
        " (copy schema.sql beside worker.py)\n"
    )
    api = run([str(croniter_only / "python"), "-c", "import worker; worker.Queue('a.db')"], cwd=copied)
    assert "worker.DatabaseUnusable: the table definition is missing" in api.stderr
    assert sorted(p.name for p in copied.iterdir() if p.name != "__pycache__") == ["jobs.py", "worker.py"]


# --- One way imports --------------------------------------------------------------------


def imports_of(module: str) -> set[str]:
    """The top-level modules a file imports, anywhere in it."""
    tree = ast.parse((HERE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def test_imports_point_one_way_cli_and_dashboard_to_the_engine() -> None:
    assert imports_of("worker") & {"worker_cli", "worker_dashboard", "jobs"} == set()
    assert "worker_cli" not in imports_of("worker_dashboard")
    assert "worker" in imports_of("worker_dashboard")
    assert {"worker", "worker_dashboard"} <= imports_of("worker_cli")


# --- The deployment recipes ---------------------------------------------------------------

DEPLOY = HERE / "deploy"


def worker_args(command: str) -> tuple[list[str], object]:
    """The arguments after the `worker` program in a command line, and how the CLI parses them."""
    words = shlex.split(command)
    index = next(i for i, word in enumerate(words) if Path(word).name == "worker")
    args = words[index + 1 :]
    return args, worker_cli.build_parser().parse_args(args)


def service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "worker.service").read_text())
    return unit["Service"]


def test_systemd_unit_restarts_on_failure_and_outlasts_the_shutdown_timeout() -> None:
    unit = service()
    args, parsed = worker_args(unit["ExecStart"])
    assert args[0] == "run"
    shutdown_timeout = getattr(parsed, "shutdown_timeout", None) or worker.DEFAULT_SHUTDOWN_TIMEOUT
    assert unit["Restart"] == "on-failure"
    assert unit["KillSignal"] == "SIGTERM"
    assert unit["KillMode"] == "mixed"  # only the supervisor is signalled; it passes SIGTERM on
    assert float(unit["TimeoutStopSec"]) > shutdown_timeout + 5  # the supervisor's own margin
    assert unit["EnvironmentFile"].endswith("worker.env")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """verify checks that the program exists, so point ExecStart at this venv's worker."""
    text = (DEPLOY / "worker.service").read_text()
    text = text.replace("/srv/myapp/.venv/bin/worker", str(Path(sys.executable).with_name("worker")))
    text = text.replace("User=myapp", "User=root").replace("Group=myapp", "Group=root")
    unit = tmp_path / "myapp-worker.service"
    unit.write_text(text)
    verified = run(["systemd-analyze", "verify", str(unit)], cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


def start_as_written(command: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A recipe's command line through the shell, with this venv's `worker` first on the PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_") and k != "DATABASE_URL"}
    return subprocess.Popen(
        ["sh", "-c", f"exec {command}"], cwd=cwd, env={**base, **env, "PATH": path},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip


@pytest.fixture
def recipe_app(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "jobs.py").write_text(GREETING_JOBS)
    yield tmp_path


def runs_a_job_and_stops_on_sigterm(process: subprocess.Popen[bytes], db: Path, stop_within: float) -> None:
    try:
        wait_for(lambda: db.exists() or process.poll() is not None, 30, "the worker to create its database")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        with worker.Queue(db, check_types=False) as producer:
            producer.enqueue("greet", {"name": "recipe"})
        wait_for(lambda: succeeded(db), 30, "the job to succeed")
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert process.wait(stop_within) == 0
        assert time.monotonic() - started < stop_within
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_systemd_units_command_and_environment_file_run_a_job_and_stop_cleanly(recipe_app: Path) -> None:
    unit = service()
    env = dict(line.split("=", 1) for line in (DEPLOY / "worker.env").read_text().splitlines()
               if line and not line.startswith("#"))  # fmt: skip
    env |= {"WORKER_DB": str(recipe_app / "app.db"), "WORKER_JOBS": "jobs"}  # the app's paths, here
    command = "worker " + shlex.join(worker_args(unit["ExecStart"])[0])
    process = start_as_written(command, recipe_app, env)
    runs_a_job_and_stops_on_sigterm(process, recipe_app / "app.db", float(unit["TimeoutStopSec"]))


def test_procfile_worker_line_runs_a_job_and_stops_cleanly(recipe_app: Path) -> None:
    lines = dict(line.split(":", 1) for line in (DEPLOY / "Procfile").read_text().splitlines() if line.strip())
    args, parsed = worker_args(lines["worker"])
    assert args[0] == "run"
    assert getattr(parsed, "shutdown_timeout", 30) < 30  # platforms kill 30 s after SIGTERM
    process = start_as_written(lines["worker"].strip(), recipe_app, {"WORKER_DB": str(recipe_app / "app.db")})
    runs_a_job_and_stops_on_sigterm(process, recipe_app / "app.db", 30)


def dockerfile() -> dict[str, list[str]]:
    """Each instruction of deploy/Dockerfile and its arguments (continuation lines joined)."""
    found: dict[str, list[str]] = {}
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            instruction, _, rest = line.strip().partition(" ")
            found.setdefault(instruction.upper(), []).append(rest.strip())
    return found


def test_dockerfile_runs_the_worker_with_a_graceful_stop_and_a_status_health_check() -> None:
    recipe = dockerfile()
    assert recipe["STOPSIGNAL"] == ["SIGTERM"]
    (health,) = recipe["HEALTHCHECK"]
    assert health.split(" CMD ", 1)[1] == '["worker", "status"]'
    (cmd,) = recipe["CMD"]
    command = yaml.safe_load(cmd)
    assert command[:2] == ["worker", "run"]
    worker_cli.build_parser().parse_args(command[1:])
    (volume,) = recipe["VOLUME"]
    environment = " ".join(recipe["ENV"])
    assert f"WORKER_DB={volume}/" in environment  # the database lives on the shared volume


def test_compose_file_shares_the_database_volume_and_checks_the_worker_with_status() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    web, worker_service = compose["services"]["web"], compose["services"]["worker"]
    db_dir = str(Path(worker_service["environment"]["WORKER_DB"]).parent)
    assert web["environment"]["WORKER_DB"] == worker_service["environment"]["WORKER_DB"]
    volume = f"data:{db_dir}"
    assert volume in web["volumes"] and volume in worker_service["volumes"]
    assert "data" in compose["volumes"]
    assert worker_service["healthcheck"]["test"] == ["CMD", "worker", "status"]
    command = worker_service["command"]
    parsed = worker_cli.build_parser().parse_args(command[1:])
    grace = float(worker_service["stop_grace_period"].rstrip("s"))
    assert grace > (parsed.shutdown_timeout or worker.DEFAULT_SHUTDOWN_TIMEOUT) + 5
    assert worker_service["image"] == web["image"]  # one image: the web app's code and its jobs

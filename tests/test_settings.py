from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.errors import ConfigError
from app.settings import load_settings

DEMO = Path(__file__).parent.parent / "app" / "demo" / "demo.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=False)
    return info.value.problems


def test_demo_config_is_valid() -> None:
    settings = load_settings(DEMO, environ=False)
    assert set(settings.upstreams) == {"users", "inventory"}
    assert settings.composites["user_overview"].sources["profile"].required is True
    assert settings.queries["recent_orders"].params == {"user_id": "int", "limit": "int"}


def test_defaults_follow_sizing_rules() -> None:
    from app.sizing import effective_cpu_count

    settings = load_settings(None, environ=False)
    cpus = effective_cpu_count()
    assert settings.database.executor_threads == min(32, cpus * 4)
    assert settings.db_pool_size == settings.database.executor_threads
    assert settings.compute.workers == cpus
    assert settings.database.queue_limit > 0
    assert settings.compute.queue_limit > 0


def test_each_problem_is_named_by_its_key_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[upstreams.users]
base_url = "ftp://example"
timeout_ms = 0
[upstreams.users.retry]
attempts = 0
[queries.q]
sql = "select * from t where id = %(id)s"
[server]
port = 70000
bogus = 1
""",
    )
    problems = problems_of(path)
    joined = "\n".join(problems)
    assert any(p.startswith("upstreams.users.base_url:") and "http" in p for p in problems), joined
    assert any(p.startswith("upstreams.users.timeout_ms:") and "greater than 0" in p for p in problems), joined
    assert any(p.startswith("upstreams.users.retry.attempts:") for p in problems), joined
    assert any(p.startswith("queries.q:") and "undeclared parameters: id" in p for p in problems), joined
    assert any(p.startswith("server.port:") for p in problems), joined
    assert any(p.startswith("server.bogus:") for p in problems), joined


def test_cross_references_are_checked(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
database_url = "postgresql://localhost/x"
[queries.q]
sql = "select %(id)s"
params = { id = "int" }
[composites.c]
params = { id = "int" }
[composites.c.sources.a]
upstream = "nope"
path = "/x/{id}"
[composites.c.sources.b]
query = "q"
[composites.c.sources.d]
upstream = "nope"
path = "/x/{other}"
""",
    )
    joined = "\n".join(problems_of(path))
    assert "composites.c: source 'd' uses undeclared params: other" in joined
    path = write(tmp_path, path.read_text().replace('path = "/x/{other}"', 'path = "/x/{id}"'))
    joined = "\n".join(problems_of(path))
    assert "unknown upstream 'nope'" in joined
    assert "source 'b': missing query params id" in joined


def test_queries_need_a_database(tmp_path: Path) -> None:
    path = write(tmp_path, '[queries.q]\nsql = "select 1"\n')
    assert any("database_url" in p for p in problems_of(path))


def test_toml_syntax_error_is_one_clear_message(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    (problem,) = problems_of(path)
    assert "not valid TOML" in problem


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[server]\nport = 9000\nhost = '0.0.0.0'\n")
    monkeypatch.setenv("GATEWAY_SERVER__PORT", "9100")
    monkeypatch.setenv("GATEWAY_DATABASE_URL", "postgresql://u@db/x")
    settings = load_settings(path)
    assert settings.server.port == 9100
    assert settings.server.host == "0.0.0.0"
    assert settings.database_url is not None
    assert settings.database_url.get_secret_value() == "postgresql://u@db/x"
    assert "postgresql" not in repr(settings)  # the URL may hold a password: never in a repr or a log


def test_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_COMPUTE__WORKERS", "lots")
    with pytest.raises(ConfigError) as info:
        load_settings(None)
    # Named by the variable, where the operator must look, and by the key path it sets.
    assert any(p.startswith("GATEWAY_COMPUTE__WORKERS (compute.workers):") for p in info.value.problems)


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "app", "check-config", str(DEMO)], capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok (2 upstreams, 2 queries, 2 composites)" in ok.stdout
    bad = write(tmp_path, "[upstreams.users]\nbase_url = 'http://x'\ntimeout_ms = -5\n")
    res = subprocess.run(
        [sys.executable, "-m", "app", "check-config", str(bad)], capture_output=True, text=True, check=False
    )
    assert res.returncode == 2
    assert "upstreams.users.timeout_ms: Input should be greater than 0" in res.stderr
    assert "Traceback" not in res.stderr


def test_the_admission_floor_may_not_exceed_the_limit_it_steers(tmp_path: Path) -> None:
    text = "[limits]\nmax_in_flight_requests = 4\nmin_in_flight_requests = 8\n"
    assert load_settings(write(tmp_path, text), environ=False).limits.max_in_flight_requests == 4  # a fixed limit
    problems = problems_of(write(tmp_path, text + "shed_loop_lag_ms = 20\n"))
    assert any("limits" in p and "min_in_flight_requests exceeds max_in_flight_requests" in p for p in problems), (
        problems
    )

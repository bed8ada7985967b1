"""What the browser tests need besides pytest: a `dagster dev` process on loopback, a GraphQL
client for it, and a headless Chromium driven by Selenium through the system chromedriver."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import pytest
import requests
import yaml

from recsae_pipeline.storage.registry import ArtifactPaths

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install -y chromium chromium-driver"
# The closed network refuses Chromium's own background connections unless they are switched
# off; a fresh profile per driver keeps runs from sharing state.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
)

T = TypeVar("T")
MATERIALIZE_TIMEOUT_S = 900


def artifacts_dir() -> Path:
    """Where screenshots go: `$RECSAE_TEST_ARTIFACTS`, else `test-artifacts/ui/` in the repo."""
    path = Path(os.environ.get("RECSAE_TEST_ARTIFACTS") or ROOT / "test-artifacts" / "ui")
    path.mkdir(parents=True, exist_ok=True)
    return path


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when Chromium and its driver exist."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the `selenium` package (pip install -e '.[dev]')")
    return f"{' and '.join(missing)} missing; run `{INSTALL_HINT}`" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    transient: tuple[type[Exception], ...] = (),
    every: float = 0.5,
) -> T:
    """`probe()` until it returns something other than None; a `transient` exception counts
    as None. Raise TimeoutError naming `what` and the last such exception."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value is not None:
                return value
        except transient as error:
            last = error
        time.sleep(every)
    raise TimeoutError(f"{what} after {timeout:.0f}s" + (f" (last error: {last})" if last else ""))


class GraphQLError(RuntimeError):
    """The server answered a GraphQL request with errors."""


class DagsterDev:
    """`dagster dev -m recsae_pipeline.defs.definitions` on 127.0.0.1 in its own process group,
    with its output in `log`."""

    def __init__(self, home: Path, data_dir: Path, log: Path, port: int | None = None) -> None:
        self.home, self.data_dir, self.log = home, data_dir, log
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "RECSAE_DATA_DIR": str(self.data_dir),
            "PYTHONUNBUFFERED": "1",
        }
        dagster = Path(sys.executable).parent / "dagster"
        command = [str(dagster), "dev", "-m", "recsae_pipeline.defs.definitions"]
        command += ["-h", "127.0.0.1", "-p", str(self.port)]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: webserver, daemon, code server
            )

    def wait_until_ready(self, timeout: float = 180.0) -> None:
        """Until the webserver answers and the code location has loaded its definitions."""

        def loaded() -> bool | None:
            self.check_alive()
            requests.get(f"{self.url}/server_info", timeout=5).raise_for_status()
            entries = self.graphql(WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
            statuses = {e["name"]: e["loadStatus"] for e in entries}
            for entry in entries:
                location = entry["locationOrLoadError"] or {}
                if location.get("__typename") == "PythonError":
                    raise RuntimeError(f"code location {entry['name']}: {location['message']}")
            return True if statuses and set(statuses.values()) == {"LOADED"} else None

        # Until the webserver is up: connection refused; while it starts: GraphQL errors.
        transient = (requests.RequestException, GraphQLError)
        try:
            poll(f"dagster dev at {self.url} not ready", loaded, timeout, transient)
        except TimeoutError as error:
            raise TimeoutError(f"{error}; {self.log} ends:\n{self.log_tail()}") from None

    def check_alive(self) -> None:
        """Raise, with the end of its log, if `dagster dev` has exited."""
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(
                f"dagster dev exited with {self.process.returncode}; {self.log} ends:\n"
                + self.log_tail()
            )

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `data` of one GraphQL request; raises with the server's errors."""
        response = requests.post(
            f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60
        )
        response.raise_for_status()
        body = response.json()
        if body.get("errors"):
            raise GraphQLError(f"GraphQL errors: {body['errors']}")
        return body["data"]

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM to `dagster dev` (it stops its webserver and daemon), then SIGKILL to its
        whole process group: the code servers it started outlive it otherwise."""
        if self.process is None:
            return
        # A SIGTERM to the whole group can leave it hung half shut down; to the leader it exits
        # in seconds.
        self.process.terminate()
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


class Deployment(NamedTuple):
    server: DagsterDev
    paths: ArtifactPaths
    """The storage root every run wrote to and the webserver reads."""


class BackgroundDeployment:
    """`dagster dev` starting while `recsae materialize -c <the tests' tiny preset>` fills the
    same fresh DAGSTER_HOME and storage root under `tmp`, both in the background: `start` at
    the beginning of the session, `wait` when the UI tests need them, `stop` at the end.

    The materialize run uses one thread (tiny models run fastest on one), so it takes the
    core the in-process tests leave free."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.home, self.data = tmp, tmp / "home", tmp / "data"
        logs = artifacts_dir()
        self.server = DagsterDev(self.home, self.data, logs / "dagster-dev.log")
        self.log = logs / "materialize.log"
        self.run: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        import dagster as dg

        from recsae_pipeline_tests import support

        self.home.mkdir(parents=True)
        (self.home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        # Create the instance's SQLite storages here, before two processes race to create them.
        with dg.DagsterInstance.from_config(str(self.home)):
            pass
        self.server.start()
        preset = self.tmp / "tiny.yaml"
        ops = {**support.MODELS_CONFIG["ops"], **support.FEATURES_CONFIG["ops"]}
        ops |= support.REPORT_CONFIG["ops"]
        preset.write_text(yaml.safe_dump({"ops": ops}))
        env = {
            **os.environ,
            "DAGSTER_HOME": str(self.home),
            "RECSAE_DATA_DIR": str(self.data),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        recsae = Path(sys.executable).parent / "recsae"
        with self.log.open("wb") as out:
            self.run = subprocess.Popen(
                [str(recsae), "materialize", "-c", str(preset)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.started = time.monotonic()

    def wait(self) -> Deployment:
        """Until the materialize run has succeeded and the webserver is ready; fails naming
        the log of whichever did not."""
        assert self.run is not None, "start() first"
        while self.run.poll() is None:
            self.server.check_alive()
            if time.monotonic() - self.started > MATERIALIZE_TIMEOUT_S:
                self.stop()
                pytest.fail(f"recsae materialize ran over {MATERIALIZE_TIMEOUT_S}s ({self.log})")
            time.sleep(0.5)
        tail = self.log.read_text(errors="replace")[-3000:]
        assert self.run.returncode == 0, f"recsae materialize failed ({self.log}):\n{tail}"
        self.server.wait_until_ready()
        self.server.graphql("mutation { setNuxSeen }")  # no "join the community" modal
        return Deployment(self.server, ArtifactPaths(self.data))

    def stop(self) -> None:
        if self.run is not None and self.run.poll() is None:
            self.run.kill()
            self.run.wait()
        self.server.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


BACKGROUND = pytest.StashKey[BackgroundDeployment]()
"""Where conftest keeps the deployment it started when the session began."""


WORKSPACE_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } }
} } } }
"""


@contextmanager
def chromium(user_data_dir: Path) -> Iterator[Any]:
    """A headless Chromium WebDriver on the system chromedriver (never Selenium Manager,
    which would try to download one), quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def page_lines(driver: Any) -> list[str]:
    """The rendered text of the page, one line per visible line."""
    return driver.find_element("tag name", "body").text.splitlines()


def wait_for(
    driver: Any, what: str, rendered: Callable[[list[str]], bool], timeout: float = 60.0
) -> list[str]:
    """Wait until `rendered(page_lines(driver))`; return those lines, or fail naming `what`
    with the start of the page's text."""
    from selenium.common.exceptions import WebDriverException  # e.g. a node replaced mid-read

    def probe() -> list[str] | None:
        lines = page_lines(driver)
        return lines if rendered(lines) else None

    try:
        return poll(
            f"{what} not rendered at {driver.current_url}", probe, timeout, (WebDriverException,)
        )
    except TimeoutError as error:
        raise AssertionError(f"{error}; page text: {page_lines(driver)[:80]}") from None


def wait_for_text(driver: Any, texts: list[str], timeout: float = 60.0) -> str:
    """Wait until every one of `texts` is in the rendered page text; return that text."""
    lines = wait_for(
        driver, repr(texts), lambda ls: all(t in "\n".join(ls) for t in texts), timeout
    )
    return "\n".join(lines)


def screenshot(driver: Any, name: str, full_page: bool = False) -> Path:
    """Save `<artifacts>/<name>.png`: the window, or with `full_page` the whole document
    (the window grows to its height for the shot)."""
    path = artifacts_dir() / f"{name}.png"
    size = driver.get_window_size()
    if full_page:
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(size["width"], max(size["height"], min(int(height), 8000)))
    try:
        driver.save_screenshot(str(path))
    finally:
        if full_page:
            driver.set_window_size(size["width"], size["height"])
    return path

"""`fedrad dashboard` in a real headless browser during a real loopback run.

Debian's chromium and chromium-driver (installed by .ci/run) driven by Selenium at /usr/bin/chromium and
/usr/bin/chromedriver: no driver or browser is downloaded (Selenium Manager is pointed at /bin/false, so it
would fail loudly were it ever run). A consortium with TLS and node authentication, two sites enrolled under
their names, a 3-round run started with `fedrad run --detach`; the dashboard, a separate `fedrad dashboard`
process with a token, is signed into; the run page shows the run, its rounds advancing without a reload and
its sites by their enrolled names; the sites page lists both connected. Every request the page made went to
127.0.0.1. The screenshot is kept in the test's tmp folder (and in $FEDRAD_SCREENSHOT_DIR when set)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from federation_harness import TINY_RUN, Consortium, wait_for

from fedrad.deploy.cli import main
from fedrad.deploy.processes import flower_env, free_port, wait_for_port

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
NAMES = ("northgate", "riverside")
TOKEN = "browser-test-token-0123456789"


def _driver():
    """Headless chromium through Debian's chromedriver; skips (saying why) where either is missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_MANAGER_PATH"] = "/bin/false"  # Selenium Manager must never run (it would download)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1400,1250"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    from fedrad.deploy.synthetic import write_synthetic_sites

    root = tmp_path_factory.mktemp("sites")
    return write_synthetic_sites(root, n_sites=2, patients_per_site=4, images_per_patient=(1, 2), size=48, seed=5)


@pytest.mark.slow
def test_dashboard_in_a_browser_follows_a_live_run(tmp_path, sites):
    from selenium.webdriver.common.by import By

    from fedrad.deploy.certs import init_certs, register_node, tls_files

    driver = _driver()
    consortium = Consortium(tmp_path)
    dashboard = None
    requests: set[str] = set()
    try:
        certs = tmp_path / "certs"
        init_certs(certs, [s.name for s in sites], ["localhost", "127.0.0.1"])
        consortium.start_link(tls_files(certs, None), node_auth=True)
        for site, name in zip(sites, NAMES, strict=True):
            register_node(tls_files(certs, site.name).node_public_key, consortium.address, certs, name=name)
            consortium.start_node(name, site, tls=tls_files(certs, site.name))
        runs = tmp_path / "runs"
        args = [x for k, v in {**TINY_RUN, "num-server-rounds": 3}.items() for x in ("-c", f"{k}={v}")]
        assert main(["run", "--detach", "--superlink", consortium.address, "--certs", str(certs), "--run-dir",
                     str(runs / "r1"), "--sign-key", str(consortium.consortium_key), *args]) == 0

        token_file = tmp_path / "dashboard-token"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        port = free_port()
        dashboard = subprocess.Popen(
            [sys.executable, "-m", "fedrad.deploy.cli", "dashboard", "--runs-dir", str(runs), "--port", str(port),
             "--superlink", consortium.address, "--certs", str(certs), "--token-file", str(token_file)],
            env=flower_env(), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "dashboard.log", "w"))
        wait_for_port("127.0.0.1", port, 60, dashboard)
        base = f"http://127.0.0.1:{port}"

        driver.get(base + "/")
        driver.find_element(By.ID, "token").send_keys(TOKEN)  # the 401 page is the sign-in form
        driver.find_element(By.ID, "sign-in").click()
        wait_for(lambda: _has(driver, "#runs-table .run-link"), 120, "the run listed on the runs page")
        driver.find_element(By.CSS_SELECTOR, "#runs-table .run-link").click()
        seen: list[int] = []

        def round_shown() -> bool:
            text = _text(driver, "run-round")  # "round N/3"
            if text.startswith("round "):
                rnd = int(text.split()[1].split("/")[0])
                if not seen or seen[-1] != rnd:
                    seen.append(rnd)
            return bool(seen) and seen[-1] == 3

        wait_for(round_shown, 600, "the run page to reach round 3/3")
        assert seen == sorted(seen) and len(seen) >= 2, f"rounds shown without a reload: {seen}"
        wait_for(lambda: "finished:completed" in _text(driver, "run-status"), 120, "the run to show completed")
        shown = _text(driver, "run-site-names")
        assert all(name in shown for name in NAMES), shown
        legend = " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, "#plot-site-loss .legendtext"))
        assert all(name in legend for name in NAMES), legend
        ticks = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#plot-loss .xtick text")]
        assert ticks and all(t.isdigit() for t in ticks), ticks  # rounds as integers
        shot = tmp_path / "dashboard-run.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("FEDRAD_SCREENSHOT_DIR"):
            shutil.copy(shot, Path(os.environ["FEDRAD_SCREENSHOT_DIR"]) / shot.name)

        driver.get(base + "/#/sites")
        wait_for(lambda: all(name in _text(driver, "sites-table") for name in NAMES), 60, "both sites by name")
        rows = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#sites-table tbody tr")]
        assert sum("online" in r for r in rows) == 2, rows
        requests = _requested(driver)
    finally:
        if dashboard is not None:
            dashboard.terminate()
            dashboard.wait(timeout=30)
        driver.quit()
        consortium.stop()
    assert requests and all(url.startswith(f"http://127.0.0.1:{port}/") for url in requests), requests


def _has(driver, css: str) -> bool:
    from selenium.webdriver.common.by import By

    return bool(driver.find_elements(By.CSS_SELECTOR, css))


def _text(driver, element_id: str) -> str:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By

    try:
        found = driver.find_elements(By.ID, element_id)
        return found[0].text if found else ""
    except WebDriverException:  # the element was replaced between finding and reading it
        time.sleep(0.1)
        return ""


def _requested(driver) -> set[str]:
    """Every URL the page asked for (Chrome's network log), data: and blob: aside."""
    urls = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            url = message["params"]["request"]["url"]
            if not url.startswith(("data:", "blob:")):
                urls.add(url)
    return urls

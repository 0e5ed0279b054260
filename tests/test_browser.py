"""The workbook as a reader sees it: a notebook opened in JupyterLab in headless Chromium, Run > Run
All Cells from the menu, and the page checked once the kernel is idle. By default notebook 03 (the one
with interactive outputs); SAE_BROWSER_NOTEBOOKS=all checks all five, or e.g. "01 05" those two.

Checked: no error output; every cell ran; every figure is on the page; in notebook 03, the
circuitsvis contexts colour their strongest tokens (and leave inactive ones white) and are
readable, in the light and the dark theme, and the ipywidgets feature browser answers ◀, ▶ and
its token search; in notebook 05, the steering playground answers Run with its three continuations
and costs, and its steered continuations change when the scale does (readable in both themes). And,
whichever notebooks are chosen, an exercise as a reader works it (exercise 02.1 of notebooks/exercises/):
a wrong attempt shows the check's message and likely cause, the solution opens on a click, the fix passes.
Screenshots of the key outputs go to cache/test/browser/<notebook>/ (the exercise's to .../exercise/).

It runs on the `test` profile after nbval has run the notebooks (the README's test command runs
notebooks/ first), so the stores and SAEs come from the cache. It needs Chromium and playwright's
Python package (the system Chromium is used; `playwright install` is never needed):
    apt-get install chromium     # Debian/Ubuntu
    pip install playwright
Set SAE_CHROMIUM to another Chromium or Chrome executable. Without one, the test is skipped.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import pytest

from helpers.settings.paths import NOTEBOOKS_DIR
from helpers.settings.profiles import get_profile

ALL_NOTEBOOKS = sorted(p.stem for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
# By default the notebook with the interactive outputs (circuitsvis views, the widget browser), so that
# the README's test command stays within 10 minutes on 2 cores; SAE_BROWSER_NOTEBOOKS=all (or a list of
# prefixes, e.g. "01 05") runs those instead (all five: about 4.5 minutes more, measured).
_chosen = os.environ.get("SAE_BROWSER_NOTEBOOKS", "03").split()
NOTEBOOKS = [n for n in ALL_NOTEBOOKS if "all" in _chosen or any(n.startswith(c) for c in _chosen)]
CHROMIUM = os.environ.get("SAE_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
try:
    from playwright.sync_api import sync_playwright
except ImportError:
    sync_playwright = None
HOW = ("the browser test needs Chromium and playwright's Python package: `apt-get install chromium` "
       "(Debian/Ubuntu) and `pip install playwright` (no `playwright install`: the system Chromium is used)")
pytestmark = pytest.mark.skipif(CHROMIUM is None or sync_playwright is None, reason=HOW)
if CHROMIUM is None or sync_playwright is None:  # say so in the summary too, not only in `-rs`
    warnings.warn(f"tests/test_browser.py is skipped: {HOW}", pytest.PytestWarning)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
RUN_TIMEOUT_S = 900  # one notebook, Run All Cells until the kernel is idle
# JupyterLab user settings for the test server: no autosave (nothing is written back), no news.
LAB_SETTINGS = {
    "docmanager-extension/plugin": {"autosave": False},
    "apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def jupyterlab(root: Path):
    """A JupyterLab server on a free port serving the folder root, with its own settings (no
    autosave, no news), workspaces and runtime files beside it, kernels on the caller's profile
    (SAE_PROFILE) drawing figures inline; stopped on exit."""
    settings = root.parent / f"{root.name}-settings"
    for plugin, values in LAB_SETTINGS.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(root.parent / f"{root.name}-workspaces"),
               JUPYTER_RUNTIME_DIR=str(root.parent / f"{root.name}-runtime"))
    env.pop("MPLBACKEND", None)  # a reader's kernel draws inline (the test suite sets Agg for nbval)
    port, token = free_port(), uuid.uuid4().hex
    log = open(root.parent / f"{root.name}-server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         "--allow-root", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: see {log.name}")
                time.sleep(0.5)
        yield {"url": url, "token": token, "root": root, "log": log.name}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving copies of the notebooks from a temporary folder (nothing is saved over
    notebooks/)."""
    root = tmp_path_factory.mktemp("lab")
    for name in ALL_NOTEBOOKS:
        shutil.copy(NOTEBOOKS_DIR / f"{name}.ipynb", root / f"{name}.ipynb")
    with jupyterlab(root) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_playwright() as pw:
        ctx = pw.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=CHROMIUM, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1600, "height": 1000})
        yield ctx
        ctx.close()


@pytest.fixture(scope="module")
def shots():
    out = get_profile().cache_dir / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


def api(lab, method, path):
    req = urllib.request.Request(f"{lab['url']}{path}", method=method,
                                 headers={"Authorization": f"token {lab['token']}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else None


# --- reading the page ------------------------------------------------------------------------

CELL_STATE = """() => [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell')]
    .map(c => (c.querySelector('.jp-InputArea-prompt') || {}).textContent || '')"""

# error outputs and stderr (warnings, progress bars) share this renderer; a traceback tells them apart
ERROR_OUTPUTS = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"

# Colours as a reader sees them: a token's own background, or else its nearest ancestor's.
COLOUR_JS = """
window.__rgba = s => { const m = s.match(/rgba?\\(([^)]*)\\)/); if (!m) return [0, 0, 0, 0];
  const v = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number); return v.length === 3 ? [...v, 1] : v; };
window.__seen = el => { for (let e = el; e; e = e.parentElement) {
  const c = __rgba(getComputedStyle(e).backgroundColor); if (c[3] > 0.5) return c; } return [255, 255, 255, 1]; };
window.__tok = el => { const s = getComputedStyle(el);
  return {text: el.textContent, bg: __rgba(s.backgroundColor), seen: __seen(el), fg: __rgba(s.color)}; };
"""


def luminance(c):
    lin = [(v / 255 / 12.92) if v / 255 <= 0.03928 else ((v / 255 + 0.055) / 1.055) ** 2.4 for v in c[:3]]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a, b):
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def is_white_or_clear(c):
    return c[3] == 0 or tuple(c[:3]) == (255, 255, 255)


def tint(c):
    """How far an opaque colour is from white (0: white; 765: black)."""
    return 765 - sum(c[:3]) if c[3] > 0 else 0


def run_notebook(page, lab, name):
    """Open the notebook, Run > Run All Cells, wait until every cell has run (or one failed) and the
    kernel is idle. Returns the seconds it took."""
    # a workspace of its own: no tab of an earlier notebook reopens
    page.goto(f"{lab['url']}/lab/workspaces/{name}/tree/{name}.ipynb?token={lab['token']}")
    # the kernel has started and is connected: the status bar reads "Python 3 (ipykernel) | Idle"
    page.wait_for_function("/\\| Idle/.test((document.querySelector('#jp-main-statusbar') || {}).innerText)",
                           timeout=120_000)
    t0 = time.perf_counter()
    page.click(".lm-MenuBar-item:has-text('Run')")
    page.click(".lm-Menu-item[data-command='runmenu:run-all']")
    dialog = page.locator(".jp-Dialog:has-text('Select Kernel') button.jp-mod-accept")
    deadline = time.time() + RUN_TIMEOUT_S
    started = False
    while time.time() < deadline:
        page.wait_for_timeout(1000)
        if dialog.count():  # should the session not have had its kernel yet: take the one offered, run all
            dialog.click()
            page.wait_for_timeout(2000)
            if not started and not any(re.search(r"\[[\d*]+\]", p) for p in page.evaluate(CELL_STATE)):
                page.click(".lm-MenuBar-item:has-text('Run')")
                page.click(".lm-Menu-item[data-command='runmenu:run-all']")
        prompts = page.evaluate(CELL_STATE)
        started = started or any(re.search(r"\[[\d*]+\]", p) for p in prompts)
        idle = page.locator(".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']").count()
        # finished: every cell has run, or a failure stopped the queue (the checks report it)
        failed = page.locator(ERROR_OUTPUTS + ":has-text('Traceback')").count()
        if started and idle and not any("*" in p for p in prompts) and (
                failed or all(re.search(r"\[\d+\]", p) for p in prompts)):
            page.wait_for_timeout(2000)  # let the last outputs and widgets render
            return time.perf_counter() - t0
    raise AssertionError(f"{name}: not finished after {RUN_TIMEOUT_S} s: {page.evaluate(CELL_STATE)}")


def change_theme(page, theme):
    page.click(".lm-MenuBar-item:has-text('Settings')")
    page.click(".lm-Menu-item:has-text('Theme')")
    page.click(f".lm-Menu-item[data-command='apputils:change-theme']:has(.lm-Menu-itemLabel:text-is('{theme}'))")
    page.wait_for_function(f"document.body.dataset.jpThemeName === '{theme}'", timeout=30_000)
    page.wait_for_timeout(500)


def check_circuitsvis(page, cell, theme, props):
    """Every circuitsvis contexts view in the cell: the strongest token of each shown context is
    coloured, its zero-activation tokens are white, every token is readable; in both groups.
    props: {element id: the TopkSamples props it was rendered from}."""
    views = cell.locator("div[id^='circuits-vis-']")
    assert views.count() >= 1
    found = []
    for v in range(views.count()):
        view = views.nth(v)
        pr = props[view.get_attribute("id")]
        # selects: Dictionary, Examples (the group: top, across the range), page, samples per page
        group, per_page = view.locator("select").nth(1), view.locator("select").nth(3)
        shown = per_page.input_value()
        per_page.select_option(index=per_page.locator("option").count() - 1)  # every sample on one page
        for g, acts in enumerate(pr["activations"][0]):
            group.select_option(index=g)
            page.wait_for_timeout(200)
            samples = view.locator(".colored-tokens")
            assert samples.count() == len(acts), (samples.count(), len(acts))
            top = max(max(a) for a in acts)
            for s in range(samples.count()):
                toks = samples.nth(s).locator("span[style*='inline-block']").evaluate_all("els => els.map(__tok)")
                a = acts[s]
                assert len(toks) == len(a), (len(toks), len(a))
                j = max(range(len(a)), key=a.__getitem__)
                where = f"{theme}, circuitsvis view {v}, group {g}, context {s}, token {toks[j]['text']!r} ({a[j]:.2f})"
                assert not is_white_or_clear(toks[j]["bg"]), f"strongest token not coloured: {where}: {toks[j]}"
                if a[j] >= 0.5 * top:  # circuitsvis: blue (tint 510) mixed with white, 198 at half the maximum
                    assert tint(toks[j]["bg"]) >= 150, f"strong token only faintly coloured: {where}: {toks[j]}"
                for t, x in zip(toks, a):
                    if x == 0:
                        assert is_white_or_clear(t["bg"]), f"zero-activation token coloured: {where}: {t}"
                    assert contrast(t["fg"], t["seen"]) >= 2.5, f"unreadable token: {where}: {t}"
                found.append(a[j] / top)
        group.select_option(index=0)  # as the reader first saw it
        per_page.select_option(shown)
    return found


def settled(page, check, timeout_s=15):
    """Run check() until it passes: the widget replaces its HTML when it changes feature, and a
    token read while the new HTML is being laid out has no computed colours yet. The last failure is
    raised after timeout_s."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return check()
        except AssertionError:
            if time.time() > deadline:
                raise
            page.wait_for_timeout(500)


def check_plain_contexts(widget, theme):
    """The browser widget's HTML contexts: each context's strongest token shaded, inactive ones not,
    every token readable."""
    rows = widget.locator(".sae-context")
    assert rows.count() >= 2
    for r in range(rows.count()):
        toks = rows.nth(r).locator(".sae-token").evaluate_all(
            "els => els.map(e => ({...__tok(e), act: parseFloat(e.dataset.act)}))")
        best = max(toks, key=lambda t: t["act"])
        assert best["act"] > 0 and not is_white_or_clear(best["bg"]) and tint(best["bg"]) >= 60, (theme, r, best)
        for t in toks:
            if t["act"] <= 0:
                assert t["bg"][3] == 0, (theme, r, t)
            assert contrast(t["fg"], t["seen"]) >= 2.5, f"unreadable token ({theme}, context {r}): {t}"


def save_and_read(page, lab, name) -> dict:
    """File > Save Notebook (the copy in the server's temporary folder), then read it back."""
    path = lab["root"] / f"{name}.ipynb"
    before = path.stat().st_mtime_ns
    page.click(".lm-MenuBar-item:has-text('File')")
    page.click(".lm-Menu-item[data-command='docmanager:save']")
    deadline = time.time() + 60
    while True:  # saved, and completely written (the server may still be writing when the time changes)
        if path.stat().st_mtime_ns != before:
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        assert time.time() < deadline, f"{name}: the notebook was not saved"
        page.wait_for_timeout(200)


def circuitsvis_props(saved: dict) -> dict:
    """{element id: props} of every circuitsvis TopkSamples output in the saved notebook."""
    found = {}
    for cell in saved["cells"]:
        for o in cell.get("outputs", []):
            html = "".join(o.get("data", {}).get("text/html", []))
            if "TopkSamples" in html:
                uid = re.search(r'id="(circuits-vis-[0-9a-f-]+)"', html)[1]
                tail = html[html.rfind("TopkSamples,"):]
                found[uid] = json.loads(re.search(r"TopkSamples,\s*(\{.*\})\s*\)\s*</script>", tail, re.S)[1])
    return found


def browser_state(widget):
    """(features matching, rank shown, feature shown, the first context's text) of the feature browser."""
    info = widget.locator(".widget-html").first.inner_text()
    m = re.search(r"(\d+) features match · showing rank (\d+): feature (\d+)", info)
    ctx = widget.locator(".sae-context")
    first = ctx.first.inner_text() if ctx.count() else ""
    return (int(m[1]), int(m[2]), int(m[3]), first) if m else (0, 0, -1, info)


def wait_for(page, what, check, timeout_s=60):
    deadline = time.time() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        page.wait_for_timeout(250)


def strongest_top_token(widget):
    """The token of the displayed feature's strongest activation (its first top context's maximum)."""
    toks = widget.locator(".sae-context").first.locator(".sae-token").evaluate_all(
        "els => els.map(e => [e.textContent, parseFloat(e.dataset.act)])")
    return max(toks, key=lambda t: t[1])[0].replace("\xa0", " ")


def check_feature_browser(page, widget):
    """▶, ◀ and the token search change the feature shown, and its contexts."""
    n, rank, f0, ctx0 = browser_state(widget)
    assert rank == 0 and n > 1, browser_state(widget)
    widget.locator("button:has-text('▶')").click()
    _, rank, f1, ctx1 = wait_for(page, "▶", lambda: (s := browser_state(widget))[1] == 1 and s[2] != f0
                                 and s[3] != ctx0 and s)
    assert f1 != f0
    widget.locator("button:has-text('◀')").click()
    wait_for(page, "◀", lambda: browser_state(widget) == (n, 0, f0, ctx0))  # the same page as at first
    # search for the token of the strongest activation of the first feature after rank 0 whose token
    # is not blank: the browser then shows only features whose strongest activation is on that
    # token, starting with one that is
    widget.locator("button:has-text('▶')").click()
    wait_for(page, "▶ again", lambda: browser_state(widget) == (n, 1, f1, ctx1))
    word, r = strongest_top_token(widget).strip(), 1
    while not word and r < min(n - 1, 20):
        widget.locator("button:has-text('▶')").click()
        r += 1
        wait_for(page, f"▶ to rank {r}", lambda: browser_state(widget)[1] == r)
        word = strongest_top_token(widget).strip()
    assert word, f"the strongest tokens of ranks 1 to {r} are all blank"
    widget.get_by_role("textbox", name="fires on").fill(word)
    m, rank, f2, _ = wait_for(page, f"search {word!r}", lambda: (s := browser_state(widget))[0] != n and s)
    assert 1 <= m < n, (m, n)
    wait_for(page, "the search's first feature", lambda: strongest_top_token(widget).strip() == word)
    return {"features": n, "rank 0": f0, "rank 1": f1, "search": word, "matches": m, "first match": f2}


def playground_state(widget) -> dict:
    """The steering playground's status line and its three continuations (unsteered, SAE, difference
    of means) as shown."""
    out = {"status": widget.locator(".steer-status").first.inner_text()}
    for key in ("unsteered", "sae", "dim"):
        text = widget.locator(f".steer-{key} .steer-text")
        out[key] = text.first.inner_text() if text.count() else ""
    return out


def run_playground(page, widget, n) -> dict:
    """Press Run and wait for run n to finish (its status names the scale); the state after it."""
    widget.locator("button:has-text('Run')").click()
    return wait_for(page, f"playground run {n}",
                    lambda: (s := playground_state(widget))["status"].startswith(f"run {n}: scale") and s,
                    timeout_s=600)


def check_playground(page, widget) -> dict:
    """Run fills the three continuations (each with the prompt and new text) and the steered ones' costs;
    moving the scale slider to its largest value and running again changes both steered continuations and
    keeps the unsteered one (greedy decoding)."""
    before = playground_state(widget)
    assert "press Run" in widget.inner_text(), before
    first = run_playground(page, widget, 1)
    prompt = widget.get_by_role("textbox", name="prompt").input_value()
    for key in ("unsteered", "sae", "dim"):
        assert first[key].startswith(prompt) and len(first[key]) > len(prompt) + 3, (key, first)
    assert widget.locator(".steer-cost").count() == 2, widget.inner_text()
    handle = widget.locator(".noUi-handle").first  # ipywidgets' slider: keyboard End = its maximum
    handle.focus()
    handle.press("End")
    second = run_playground(page, widget, 2)
    scale = float(re.search(r"scale (-?[\d.]+)", second["status"])[1])
    assert scale > float(re.search(r"scale (-?[\d.]+)", first["status"])[1]), (first["status"], second["status"])
    assert second["unsteered"] == first["unsteered"], (first, second)
    assert second["sae"] != first["sae"] and second["dim"] != first["dim"], (first, second)
    return {"first": first, "second": second}


def check_playground_readable(widget, theme):
    """The continuations' text, and the marked concept words, are readable in the theme."""
    texts = widget.locator(".steer-text, .steer-hit").evaluate_all("els => els.map(__tok)")
    assert texts, widget.inner_text()
    for t in texts:
        assert contrast(t["fg"], t["seen"]) >= 4.5, f"unreadable playground text ({theme}): {t}"


def check_notebook(page, lab, name, out) -> dict:
    """Run the notebook in the page and check it as a reader would; screenshots into out/."""
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    seconds = run_notebook(page, lab, name)
    report = {"run_all_seconds": round(seconds, 1)}
    page.add_script_tag(content=COLOUR_JS)
    saved = save_and_read(page, lab, name)
    source = [c for c in saved["cells"] if c["cell_type"] == "code"]
    for i, c in enumerate(source):  # the saved file agrees with the page
        for o in c["outputs"]:
            assert o["output_type"] != "error", f"{name}, code cell {i}: {o['ename']}: {o['evalue']}"
        assert c["execution_count"], f"{name}, code cell {i} did not run"
    props = circuitsvis_props(saved)
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell")
    assert cells.count() == len(source)
    prompts = page.evaluate(CELL_STATE)
    for i, (cell_src, prompt) in enumerate(zip(source, prompts)):
        src = "".join(cell_src["source"])
        cell = cells.nth(i)
        for text in cell.locator(ERROR_OUTPUTS).evaluate_all("els => els.map(e => e.innerText)"):
            assert not re.search(r"Traceback|^\w+(Error|Exception): ", text, re.M), \
                f"{name}, code cell {i}: error output:\n{text[-3000:]}"
        assert re.fullmatch(r"\[\d+\]:", prompt.strip()), f"{name}, code cell {i} did not run: {prompt!r}"
        imgs = cell.locator(".jp-OutputArea-output img").evaluate_all(
            "els => els.map(e => [e.naturalWidth, e.naturalHeight])")
        assert all(w > 50 and h > 50 for w, h in imgs), (name, i, imgs)
        # every figure the cell draws (one per plots.* or dashboard call) and every image it output
        drawn = len(re.findall(r"\bplots\.[a-z]\w*\(|\bdashboard\(", src))  # plots._private: no figure
        output = sum("image/png" in o.get("data", {}) for o in cell_src["outputs"])
        assert len(imgs) >= max(drawn, output), \
            f"{name}, code cell {i}: {drawn} figure(s) drawn, {output} output, {len(imgs)} shown"
        report["figures"] = report.get("figures", 0) + len(imgs)
    # the key outputs: figures, circuitsvis views and widgets, in the light theme; then, in the dark
    # one, the outputs whose colours the theme can change (circuitsvis views and widgets: a matplotlib
    # figure is a fixed image)
    key = [i for i in range(len(source)) if cells.nth(i).locator(
        ".jp-OutputArea-output img, div[id^='circuits-vis-'], .jupyter-widgets").count()]
    assert key, f"{name}: no figure, circuitsvis view or widget on the page"
    themed = [i for i in key if cells.nth(i).locator("div[id^='circuits-vis-'], .jupyter-widgets").count()]
    for theme in ("JupyterLab Light", "JupyterLab Dark") if themed else ("JupyterLab Light",):
        if theme != "JupyterLab Light":
            change_theme(page, theme)
        tag = theme.split()[-1].lower()
        for i in key if tag == "light" else themed:
            cell = cells.nth(i)
            if cell.locator("div[id^='circuits-vis-']").count():
                report[f"cell {i} circuitsvis, {tag}: strongest token of each context / group max"] = \
                    sorted(round(x, 2) for x in check_circuitsvis(page, cell, tag, props))
            widget = cell.locator(".jupyter-widgets.widget-vbox").first
            playground = cell.locator(".sae-steering")
            if playground.count():  # notebook 05's steering playground
                if tag == "light":
                    widget.screenshot(path=str(out / f"cell{i:02d}-playground-before-{tag}.png"))
                    report[f"cell {i} steering playground"] = check_playground(page, playground.first)
                settled(page, lambda: check_playground_readable(playground.first, tag))
            elif widget.count():
                settled(page, lambda: check_plain_contexts(widget, tag))
                if tag == "light":
                    widget.screenshot(path=str(out / f"cell{i:02d}-widget-before-{tag}.png"))
                    report[f"cell {i} feature browser"] = check_feature_browser(page, widget)
                    settled(page, lambda: check_plain_contexts(widget, tag))
            cell.locator(".jp-Cell-outputWrapper").screenshot(path=str(out / f"cell{i:02d}-{tag}.png"))
        if theme != "JupyterLab Light":
            change_theme(page, "JupyterLab Light")
    assert not errors, f"{name}: JavaScript errors on the page: {errors}"
    return report


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_in_jupyterlab(name, lab, browser, shots):
    out = shots / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    page = browser.new_page()
    try:
        report = check_notebook(page, lab, name, out)
        (out / "report.json").write_text(json.dumps(report, indent=1))
        print(name, json.dumps(report))
    except BaseException:
        page.screenshot(path=str(out / "failure.png"))
        raise
    finally:
        page.close()
        for s in api(lab, "GET", "/api/sessions"):  # free the kernel's memory before the next notebook
            api(lab, "DELETE", f"/api/sessions/{s['id']}")


# --- an exercise, as a reader works it ---------------------------------------------------------

EXERCISE_ATTEMPT = '''# Exercise 02.1
import torch
from helpers.exercises import check


def sae_forward(x, W_enc, b_enc, W_dec, b_dec):
    """x: [batch, d_in]; W_enc, W_dec: [d_sae, d_in] (one row per latent); b_enc: [d_sae]; b_dec: [d_in].
    Returns (codes [batch, d_sae], x_hat [batch, d_in]).
    """
    codes = torch.relu(x @ W_enc.T + b_enc)   # a first attempt
    x_hat = codes @ W_dec + b_dec
    return codes, x_hat


check("02.1", sae_forward)'''
EXERCISE_FIXED = EXERCISE_ATTEMPT.replace("torch.relu(x @ W_enc.T + b_enc)   # a first attempt",
                                          "torch.relu((x - b_dec) @ W_enc.T + b_enc)   # after the check's message")


def exercise_demo(root: Path) -> str:
    """A notebook with exercise 02.1 as the exercise version shows it (its text and its hidden solution,
    from notebooks/exercises/), a wrong attempt and the fixed one; its name in root."""
    import nbformat

    cells = json.loads((NOTEBOOKS_DIR / "exercises" / "02_train.ipynb").read_text())["cells"]
    text = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
    intro = next(t for t in text if t.startswith("### Exercise 02.1"))
    solution = next(t for t in text if t.startswith("<details>") and "# Exercise 02.1" in t)
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3 (ipykernel)"}})
    nb.cells = [nbformat.v4.new_markdown_cell(intro), nbformat.v4.new_code_cell(EXERCISE_ATTEMPT),
                nbformat.v4.new_markdown_cell(solution), nbformat.v4.new_code_cell(EXERCISE_FIXED)]
    nbformat.write(nb, root / "exercise_demo.ipynb")
    return "exercise_demo"


def test_exercise_check_in_jupyterlab(lab, browser, shots):
    """A wrong attempt at exercise 02.1 shows the check's message and its likely cause, without frames of
    the checker; the solution is hidden until its Solution line is clicked; the fixed function passes.
    Readable in the light and dark themes; screenshots in cache/test/browser/exercise/."""
    name = exercise_demo(lab["root"])
    out = shots / "exercise"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    page = browser.new_page()
    try:
        page.set_viewport_size({"width": 1300, "height": 1700})
        page.goto(f"{lab['url']}/lab/workspaces/{name}/tree/{name}.ipynb?token={lab['token']}")
        page.wait_for_function("/\\| Idle/.test((document.querySelector('#jp-main-statusbar') || {}).innerText)",
                               timeout=120_000)
        cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-CodeCell")
        for i in range(2):  # run each code cell (Run All would stop at the failed check)
            cells.nth(i).locator(".jp-InputArea-prompt").click()
            page.keyboard.press("Shift+Enter")
            page.wait_for_function(f"() => /\\[\\d+\\]/.test(({CELL_STATE})()[{i}])", timeout=300_000)
        wait_for(page, "the fixed function's check", lambda: "✔" in cells.nth(1).inner_text())
        failed = cells.nth(0).locator(".jp-OutputArea-output").inner_text()
        assert "ExerciseFailed: Exercise 02.1 (sae_forward) differs from the reference" in failed, failed
        assert "likely cause: the encoder sees x - b_dec" in failed, failed
        assert "Traceback" not in failed and "core.py" not in failed, failed
        assert "matches the reference" in cells.nth(1).locator(".jp-OutputArea-output").inner_text()
        details = page.locator(".jp-MarkdownCell details").first
        assert not details.evaluate("d => d.open") and not page.get_by_text("(x - b_dec) @ W_enc.T").first.is_visible()
        details.locator("summary").click()
        assert details.evaluate("d => d.open")
        page.add_script_tag(content=COLOUR_JS)
        for theme in ("JupyterLab Light", "JupyterLab Dark"):
            if theme != "JupyterLab Light":
                change_theme(page, theme)
            tag = theme.split()[-1].lower()
            message = cells.nth(0).locator(".jp-OutputArea-output pre").first.evaluate("__tok")
            assert contrast(message["fg"], message["seen"]) >= 4.5, f"unreadable check message ({tag}): {message}"
            page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook").screenshot(
                path=str(out / f"exercise-02.1-{tag}.png"))
        change_theme(page, "JupyterLab Light")
    except BaseException:
        page.screenshot(path=str(out / "failure.png"))
        raise
    finally:
        page.close()
        for s in api(lab, "GET", "/api/sessions"):
            api(lab, "DELETE", f"/api/sessions/{s['id']}")

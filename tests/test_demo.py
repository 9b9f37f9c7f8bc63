"""``looppool demo``: the local site, the crawler's parsing, and a --quick run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections import deque
from pathlib import Path

import pytest

import looppool
from cli_workers import leftover_processes, process_is_gone
from looppool import _demo
from looppool._console import ProgressBar

pytest.importorskip("aiohttp")

SRC = Path(looppool.__file__).resolve().parent.parent
DEADLINE = 120  # seconds the quick demo may take before the test fails


def test_quick_demo_crawls_twice_and_leaves_no_process() -> None:
    """--quick crawls the site with one process then a pool, both fully, and cleans up."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(SRC)
    env["LOOPPOOL_TEST_MARK"] = marker
    proc = subprocess.run(
        [sys.executable, "-m", "looppool", "demo", "--quick", "--size", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=DEADLINE,
    )
    assert leftover_processes(marker) == []
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"a site of 400 pages and an index at http://127\.0\.0\.1:\d+/", out)
    rates = re.findall(r"401 pages in [\d.]+ s: [\d,]+ pages/s", out)
    assert len(rates) == 2, out  # one process, then the pool: every page each time
    assert "2 workers (" in out
    assert re.search(r"speed-up +[\d.]+x with 2 workers", out)
    assert "both crawls read the same 401 pages" in out
    assert proc.stderr == ""  # no progress bar off a terminal, no error


def test_site_is_reachable_from_its_index() -> None:
    """Every generated page can be reached by following links from ``/``."""
    site = _demo.generate_site(300, seed=7)
    assert len(site) == 301
    seen = {"/"}
    todo = deque(["/"])
    while todo:
        path = todo.popleft()
        page = _demo.analyse_page("http://127.0.0.1:1" + path, 200, site[path].encode())
        for link in page.links:
            link_path = link.removeprefix("http://127.0.0.1:1")
            assert link_path in site, link
            if link_path not in seen:
                seen.add(link_path)
                todo.append(link_path)
    assert seen == set(site)


def test_generate_site_is_deterministic() -> None:
    """The same size and seed give the same site (both crawls read the same pages)."""
    assert _demo.generate_site(50, seed=3) == _demo.generate_site(50, seed=3)
    assert _demo.generate_site(50, seed=3) != _demo.generate_site(50, seed=4)


def test_analyse_page_links_words_and_hashes() -> None:
    """Links are resolved, de-fragmented and kept on-site; words are counted; hashes set."""
    html = (
        b"<html><head><title>T</title></head><body><p>alpha beta <a href='/b#x'>beta</a> "
        b"gamma</p><a href='http://elsewhere.example/'>off</a><a href='c.html'>c</a>"
        b"<a href='/b'>again</a></body></html>"
    )
    page = _demo.analyse_page("http://127.0.0.1:8/dir/a.html", 200, html)
    assert page.links == ("http://127.0.0.1:8/b", "http://127.0.0.1:8/dir/c.html")
    assert page.words == 7  # alpha beta beta gamma off c again; the title is not text
    assert page.top_word == "beta"
    assert page.digest != 0
    assert len(page.fingerprint) == 2
    assert page.error is None


@pytest.mark.asyncio
async def test_site_process_serves_pages_and_stops() -> None:
    """The site answers in its own process (200, 404, keep-alive) and exits when stopped."""
    import aiohttp

    site = _demo.Site(20, "asyncio")
    await site.start()
    try:
        assert site.pid != os.getpid()
        async with aiohttp.ClientSession() as session:
            for _ in range(2):  # the second request reuses the connection
                async with session.get(site.url + "page/3.html") as response:
                    assert response.status == 200
                    assert response.headers["Server"] == "looppool-demo"
                    assert "<title>Page 3:" in await response.text()
            async with session.get(site.url + "nope") as response:
                assert response.status == 404
    finally:
        await site.stop()
    assert process_is_gone(site.pid, 10)


@pytest.mark.asyncio
async def test_crawl_worker_reports_a_failed_fetch_as_a_page() -> None:
    """A fetch that fails still yields one Page (with its error), so a crawl always ends."""
    sent: list[_demo.Page] = []
    worker = _demo.CrawlWorker(connections=2)
    worker._looppool_sink = sent.append
    await worker.initialise()
    try:
        # Port 9 on loopback: nothing listens there, the connection is refused.
        await worker.process_message("http://127.0.0.1:9/")
    finally:
        await worker.finalise()
    assert len(sent) == 1
    assert sent[0].url == "http://127.0.0.1:9/"
    assert sent[0].error is not None


@pytest.mark.asyncio
async def test_inline_crawl_reads_every_page() -> None:
    """The one-process crawl reads the whole site and counts every page once."""
    site = _demo.Site(60, "asyncio")
    await site.start()
    try:
        crawl = _demo._Crawl(site.url, ProgressBar(sys.stderr, enabled=False))
        await _demo._crawl_inline(crawl, 4)
    finally:
        await site.stop()
    assert crawl.pages == 61
    assert crawl.errors == []
    assert crawl.outstanding == 0
    assert len(crawl.seen) == 61


def test_demo_without_aiohttp_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without aiohttp the demo explains what to install, exit 2."""
    import importlib.util
    import io

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "aiohttp" else real_find_spec(name, *a),
    )
    err = io.StringIO()
    assert _demo.run_demo(quick=True, out=io.StringIO(), err=err) == 2
    assert "pip install 'looppool[demo]'" in err.getvalue()

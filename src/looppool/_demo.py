"""``looppool demo``: crawl a local site with one process, then with a pool.

The seed package's ``FetchWorker`` example, made real and offline::

    site process                    the demo (parent process)                pool workers
    ────────────                    ─────────────────────────                ────────────
    every page built beforehand ◄── 1. a CrawlWorker on the parent's loop
    as an HTTP response, served     2. a Pool of CrawlWorkers ──── URL ────► GET (aiohttp),
    on 127.0.0.1:<free port>    ◄──────────────────────────────────────────  parse (html.parser),
                                    keeps the URLs seen, puts ◄─── Page ───  count words, hash
                                    the new ones, counts pages

Each crawl starts at ``/`` and follows links until every reachable page was
read; the parent keeps the set of URLs seen, so a page is fetched once. The
site runs in a process of its own, answering from pre-built responses, so the
comparison measures the crawler: the demo prints the site's CPU use too.
Both crawls must read the same pages (same words, same digest).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hashlib
import importlib.util
import os
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Literal, TextIO, cast
from urllib.parse import urldefrag, urljoin

from ._console import ProgressBar, loop_factory
from ._pool import Pool
from ._worker import SafeWorker

if TYPE_CHECKING:
    import aiohttp

LoopKind = Literal["auto", "asyncio", "uvloop"]

__all__ = ["CrawlWorker", "Page", "analyse_page", "generate_site", "run_demo"]

DEFAULT_PAGES = 3000
QUICK_PAGES = 400
#: Concurrent fetches in one crawling worker (the pool's ``concurrency``).
CONNECTIONS = 16
#: Links from each page to random others (besides the next page).
LINKS_PER_PAGE = 12
#: Seconds a crawl may take before the demo gives up (a safety net only).
CRAWL_DEADLINE = 600.0
#: Seconds the site process may take to build its pages and listen.
SITE_START_DEADLINE = 60.0
#: Seconds the site process gets to exit after being told to.
SITE_STOP_DEADLINE = 5.0
SEED = 20150101
#: The directory holding the looppool package: the site process imports it from there.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------
# The site: generated pages, served from their own process

_SYLLABLES = (
    *("ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "zu", "ri", "mo", "ba"),
    *("te", "lin", "gor", "fa", "hu", "sel", "an", "or", "eth", "ul", "quo", "vin", "dar"),
)


def _vocabulary(rng: random.Random, size: int = 2000) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def _page_path(number: int) -> str:
    return f"/page/{number}.html"


def _page_html(number: int, pages: int, words: list[str], seed: int) -> str:
    rng = random.Random(seed * 1_000_003 + number)
    # Random links make the crawl's frontier grow fast; the link to the next
    # page makes every page reachable from the first.
    targets = [*rng.sample(range(pages), min(LINKS_PER_PAGE, pages)), (number + 1) % pages]
    out = [
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>Page {number}: {rng.choice(words)}</title></head>\n<body>"
        f"<h1>Page {number}</h1><nav><a href='/'>home</a></nav>\n"
    ]
    linked = 0
    for _ in range(12):
        parts = []
        for _ in range(rng.randint(40, 70)):
            word = rng.choice(words)
            roll = rng.random()
            if roll < 0.04 and linked < len(targets):
                parts.append(f'<a href="{_page_path(targets[linked])}">{word}</a>')
                linked += 1
            elif roll < 0.08:
                parts.append(f"<em>{word}</em>")
            elif roll < 0.10:
                parts.append(f"<code>{word}</code>")
            else:
                parts.append(word)
        out.append("<p>" + " ".join(parts) + ".</p>\n")
    out.append("<ul>")
    out.extend(f'<li><a href="{_page_path(t)}#top">page {t}</a></li>' for t in targets[linked:])
    out.append("</ul>\n</body></html>\n")
    return "".join(out)


def generate_site(pages: int, seed: int = SEED) -> dict[str, str]:
    """Generate the site: ``{path: html}`` for ``/`` and ``pages`` linked pages."""
    rng = random.Random(seed)
    words = _vocabulary(rng)
    site = {_page_path(n): _page_html(n, pages, words, seed) for n in range(pages)}
    index_links = "".join(
        f'<li><a href="{_page_path(n)}">page {n}</a></li>' for n in range(min(pages, 20))
    )
    site["/"] = (
        "<!DOCTYPE html>\n<html><head><title>looppool demo site</title></head><body>"
        f"<h1>A generated site of {pages} pages</h1><ul>{index_links}</ul></body></html>\n"
    )
    return site


def _response(status: str, body: bytes, *, content_type: bytes = b"text/html") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\nServer: looppool-demo\r\n"
        b"Content-Type: " + content_type + b"; charset=utf-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


_NOT_FOUND = _response("404 Not Found", b"not found\n", content_type=b"text/plain")
_BAD_REQUEST = _response("400 Bad Request", b"bad request\n", content_type=b"text/plain")
_NOT_ALLOWED = _response("405 Method Not Allowed", b"GET only\n", content_type=b"text/plain")
_MAX_HEAD = 1 << 16


class _SiteProtocol(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and pipelining: enough for GET, and cheap.

    Every response is built before the server listens, so serving one is a
    dict look-up and a write: the site costs little CPU next to the crawler.
    """

    def __init__(self, responses: dict[bytes, bytes]) -> None:
        self._responses = responses
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport: no isinstance.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        assert transport is not None
        buffer = self._buffer + data
        while (end := buffer.find(b"\r\n\r\n")) >= 0:
            head, buffer = buffer[:end], buffer[end + 4 :]
            request_line, _, headers = head.partition(b"\r\n")
            parts = request_line.split(b" ")
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                transport.write(_BAD_REQUEST)
                transport.close()
                return
            method, target, _version = parts
            if method != b"GET" or b"content-length:" in headers.lower():
                transport.write(_NOT_ALLOWED)
                transport.close()
                return
            transport.write(self._responses.get(target.partition(b"?")[0], _NOT_FOUND))
            if b"connection: close" in headers.lower():
                transport.close()
                return
        if len(buffer) > _MAX_HEAD:
            transport.write(_BAD_REQUEST)
            transport.close()
            return
        self._buffer = buffer


async def _serve(pages: int, seed: int, parent_pid: int) -> None:
    loop = asyncio.get_running_loop()
    responses = {
        path.encode(): _response("200 OK", html.encode())
        for path, html in generate_site(pages, seed).items()
    }
    stop = asyncio.Event()
    server = await loop.create_server(
        lambda: _SiteProtocol(responses), "127.0.0.1", 0, backlog=1024
    )
    port = server.sockets[0].getsockname()[1]
    # The parent says "stop" (or closes our stdin); if it dies first, its
    # pidfd becomes readable: either way no site process is left behind.
    stdin = sys.stdin.buffer

    def on_stdin() -> None:
        line = stdin.readline()
        if not line or line.strip() == b"stop":
            stop.set()

    loop.add_reader(stdin.fileno(), on_stdin)
    pidfd = -1
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(parent_pid)
        except ProcessLookupError:
            return
        except OSError:
            pidfd = -1
        else:
            loop.add_reader(pidfd, stop.set)
    sys.stdout.write(f"{port}\n")
    sys.stdout.flush()
    try:
        async with server:
            await stop.wait()
    finally:
        loop.remove_reader(stdin.fileno())
        if pidfd >= 0:
            loop.remove_reader(pidfd)
            os.close(pidfd)


def serve_main(argv: list[str] | None = None) -> None:
    """Entry of the site process: ``PAGES SEED PARENT_PID LOOP`` as arguments."""
    pages, seed, parent_pid, loop = (argv if argv is not None else sys.argv[1:])[:4]
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        runner.run(_serve(int(pages), int(seed), int(parent_pid)))


class Site:
    """The site's process, started by :meth:`start` and ended by :meth:`stop`."""

    def __init__(self, pages: int, loop: str, seed: int = SEED) -> None:
        self.pages = pages
        self.seed = seed
        self.loop = loop
        self.url = ""
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        """The site process's pid."""
        assert self._process is not None
        return self._process.pid

    async def start(self) -> None:
        """Start the site process; return once it listens (its URL in :attr:`url`)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH", "")) if p
        )
        code = "from looppool._demo import serve_main; serve_main()"
        self._process = process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            str(self.pages),
            str(self.seed),
            str(os.getpid()),
            self.loop,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(SITE_START_DEADLINE):
                line = await process.stdout.readline()
        except BaseException:
            await self.stop()
            raise
        if not line.strip().isdigit():
            await self.stop()
            raise RuntimeError(f"the demo site failed to start (exit code {process.returncode})")
        self.url = f"http://127.0.0.1:{int(line)}/"

    async def stop(self) -> None:
        """Tell the site process to exit and wait for it; kill it if it lingers."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        assert process.stdin is not None
        try:
            process.stdin.write(b"stop\n")
            process.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            async with asyncio.timeout(SITE_STOP_DEADLINE):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the site process has used so far."""
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


# ---------------------------------------------------------------------------
# The crawler


@dataclass(frozen=True, slots=True)
class Page:
    """What a worker learnt from one URL: the result it sends to the parent."""

    url: str
    status: int
    words: int = 0
    top_word: str = ""
    links: tuple[str, ...] = ()
    digest: int = 0
    fingerprint: tuple[int, ...] = ()
    error: str | None = None


class _PageParser(HTMLParser):
    """Collects the links (``<a href>``), the title and the text of a page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.text: list[str] = []
        self.title: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.extend(value for name, value in attrs if name == "href" and value)
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        (self.title if self._in_title else self.text).append(data)


_WORD = re.compile(r"[a-z]+")
_SHINGLE = 4
_FINGERPRINT_HASHES = (b"looppool-demo-0", b"looppool-demo-1")


def analyse_page(url: str, status: int, body: bytes) -> Page:
    """Parse a page the way a crawler would: CPU work, on the worker's loop.

    html.parser extracts links and text; the words are counted; a SHA-256
    digest identifies the content and a MinHash of 4-word shingles (BLAKE2b)
    gives a near-duplicate fingerprint.
    """
    parser = _PageParser()
    parser.feed(body.decode("utf-8", "replace"))
    parser.close()
    links: dict[str, None] = {}
    for href in parser.links:
        link = urldefrag(urljoin(url, href)).url
        if link.startswith(url[: url.index("/", 8) + 1]):  # same site only
            links[link] = None
    words = _WORD.findall(" ".join(parser.text).lower())
    counts = collections.Counter(words)
    top_word = counts.most_common(1)[0][0] if counts else ""
    shingles = [
        " ".join(words[i : i + _SHINGLE]).encode() for i in range(len(words) - _SHINGLE + 1)
    ]
    fingerprint = tuple(
        min(
            (
                int.from_bytes(hashlib.blake2b(s, digest_size=8, person=person).digest(), "big")
                for s in shingles
            ),
            default=0,
        )
        for person in _FINGERPRINT_HASHES
    )
    digest = int.from_bytes(hashlib.sha256(body).digest()[:8], "big")
    return Page(url, status, len(words), top_word, tuple(links), digest, fingerprint)


class CrawlWorker(SafeWorker):
    """Fetches a URL with aiohttp and sends back a :class:`Page` (``put_result``).

    The asyncio form of the seed's ``FetchWorker``: one HTTP session per
    worker, opened in :meth:`initialise` and closed in :meth:`finalise`; many
    fetches in flight at once, the parsing done on the same loop. Every URL
    gets exactly one :class:`Page`, an error included, so the parent can tell
    when the crawl is over.
    """

    def __init__(self, connections: int = CONNECTIONS) -> None:
        self.connections = connections

    async def initialise(self) -> None:
        """Open the worker's HTTP session."""
        import aiohttp

        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.connections),
            timeout=aiohttp.ClientTimeout(total=60),
        )

    async def process_message(self, message: str) -> None:
        """Fetch the page at URL ``message``, analyse it, put the :class:`Page`."""
        session: aiohttp.ClientSession = self.session
        try:
            async with session.get(message) as response:
                body = await response.read()
                status = response.status
            page = analyse_page(message, status, body)
        except Exception as exc:
            page = Page(message, 0, error=f"{type(exc).__name__}: {exc}")
        self.put_result(page)

    async def finalise(self) -> None:
        """Close the worker's HTTP session."""
        await self.session.close()


@dataclass
class _Crawl:
    """The parent's side of a crawl: URLs seen, URLs out, what came back."""

    start_url: str
    bar: ProgressBar
    seen: set[str] = field(default_factory=set)
    todo: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: int = 0
    pages: int = 0
    errors: list[str] = field(default_factory=list)
    words: int = 0
    digest: int = 0
    elapsed: float = 0.0

    def add(self, url: str) -> None:
        if url not in self.seen:
            self.seen.add(url)
            self.outstanding += 1
            self.todo.put_nowait(url)

    def on_page(self, page: Page) -> None:
        """Count a page and queue the links not seen yet (the pool's ``on_result``)."""
        self.outstanding -= 1
        if page.error is not None or page.status != 200:
            self.errors.append(f"{page.url}: {page.error or page.status}")
        else:
            self.pages += 1
            self.words += page.words
            self.digest ^= page.digest
            self.bar.update(self.pages)
        for link in page.links:
            self.add(link)
        if self.outstanding == 0:
            self.finished.set()

    async def run(self, put: Callable[[str], Awaitable[None]]) -> None:
        """Feed URLs to ``put`` from the first one until no page is outstanding."""

        async def feed() -> None:
            while True:
                await put(await self.todo.get())

        started = time.monotonic()
        self.add(self.start_url)
        async with asyncio.timeout(CRAWL_DEADLINE), asyncio.TaskGroup() as group:
            feeder = group.create_task(feed())
            await self.finished.wait()
            self.elapsed = time.monotonic() - started
            feeder.cancel()
        self.bar.close()


async def _crawl_inline(crawl: _Crawl, connections: int) -> None:
    """One process: a CrawlWorker on this loop, at most ``connections`` messages at once."""
    worker = CrawlWorker(connections)
    worker.number = 0
    # The hook a runtime sets so that put_result() reaches it (as InlinePool does).
    worker._looppool_sink = crawl.on_page
    await worker.initialise()
    room = asyncio.Semaphore(connections)
    tasks: set[asyncio.Task[None]] = set()

    async def process(url: str) -> None:
        try:
            await worker.process_message(url)
        finally:
            room.release()

    async def put(url: str) -> None:
        await room.acquire()
        task = asyncio.create_task(process(url))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        await crawl.run(put)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await worker.finalise()


@dataclass(frozen=True)
class _Measure:
    pages: int
    elapsed: float
    errors: list[str]
    words: int
    digest: int
    site_cpu: float

    @property
    def rate(self) -> float:
        return self.pages / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        return (
            f"{self.pages:,} pages in {self.elapsed:.2f} s: {self.rate:,.0f} pages/s "
            f"(the site used {self.site_cpu / max(self.elapsed, 1e-9):.0%} of a CPU)"
        )


async def _measure(site: Site, crawl: _Crawl, crawling: Awaitable[None]) -> _Measure:
    cpu_before = site.cpu_seconds()
    await crawling
    site_cpu = site.cpu_seconds() - cpu_before
    return _Measure(crawl.pages, crawl.elapsed, crawl.errors, crawl.words, crawl.digest, site_cpu)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


async def _demo(pages: int, size: int, loop: LoopKind, out: TextIO, err: TextIO) -> int:
    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    running = type(asyncio.get_running_loop()).__module__
    loop_name = "uvloop" if running.startswith("uvloop") else "asyncio"
    workers = f"{size} worker{'s' if size > 1 else ''}"
    site = Site(pages, loop)
    await site.start()

    def new_crawl() -> _Crawl:
        return _Crawl(site.url, ProgressBar(err, total=pages + 1, unit="pages"))

    try:
        say(
            f"looppool demo: a site of {pages:,} pages and an index at {site.url} "
            f"(its own process, pid {site.pid})"
        )
        say(
            f"  one process   1 worker inline on one {loop_name} loop, "
            f"{CONNECTIONS} fetches at a time"
        )
        crawl = new_crawl()
        one = await _measure(site, crawl, _crawl_inline(crawl, CONNECTIONS))
        say(f"                {one.line()}")

        crawl = new_crawl()
        began = time.monotonic()
        pool = Pool(
            functools.partial(CrawlWorker, CONNECTIONS),
            size,
            loop=loop,
            concurrency=CONNECTIONS,
            name="demo-crawler",
            on_result=crawl.on_page,
        )
        async with pool:
            startup = time.monotonic() - began
            say(
                f"  pool          {workers} ({pool.loop_kind}, {pool.start_method}), "
                f"{CONNECTIONS} fetches at a time each; started in {startup:.2f} s, not counted"
            )
            many = await _measure(site, crawl, crawl.run(pool.put))
        say(f"                {many.line()}")
    finally:
        await site.stop()

    speedup = many.rate / one.rate if one.rate > 0 else 0.0
    say(f"  speed-up      {speedup:.2f}x with {workers} on {_cpus()} CPUs")
    same = (one.pages, one.words, one.digest) == (many.pages, many.words, many.digest)
    errors = one.errors + many.errors
    for line in errors[:10]:
        err.write(f"looppool demo: {line}\n")
    if not same:
        err.write(
            "looppool demo: the two crawls differ: "
            f"{one.pages} vs {many.pages} pages, {one.words} vs {many.words} words\n"
        )
    if errors or not same:
        return 1
    say(
        f"  both crawls read the same {one.pages:,} pages: {one.words:,} words, "
        f"digest {one.digest:016x}"
    )
    return 0


def run_demo(
    *,
    pages: int | None = None,
    size: int | None = None,
    quick: bool = False,
    loop: LoopKind = "auto",
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run the demo; print pages/s of both crawls and the speed-up. Returns the exit status.

    ``pages``: the site's size (default 3000, or 400 with ``quick``); ``size``:
    the pool's worker processes (default: one per CPU).
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    if importlib.util.find_spec("aiohttp") is None:
        err.write("looppool: error: the demo needs aiohttp: pip install 'looppool[demo]'\n")
        return 2
    pages = pages if pages is not None else (QUICK_PAGES if quick else DEFAULT_PAGES)
    size = size if size is not None else _cpus()
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(_demo(pages, size, loop, out, err))

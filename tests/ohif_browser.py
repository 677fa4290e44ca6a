"""OHIF Viewer in a real headless Chromium, for tests/test_ohif.py.

Two parts, both written for these tests:

- ``OhifServer``: a threaded HTTP server on a loopback port that serves OHIF's prebuilt static app
  (``npm pack @ohif/app``'s ``dist/``) with our own ``/app-config.js``, falls back to ``index.html``
  for the app's routes (``/viewer``), and reverse-proxies ``/dicom-web/*`` to Orthanc, so that the
  viewer and its DICOMweb server share one origin (Orthanc's DICOMweb plugin sends no CORS headers).
- ``Chromium``: ``chromium --headless=new`` driven over the Chrome DevTools Protocol (CDP) on a
  websocket: navigate, evaluate JavaScript, click like a mouse, take screenshots, and collect the
  page's console errors and uncaught exceptions.
- ``OhifViewer``: what a user does in OHIF (open a study, double-click a series thumbnail, answer a
  viewport prompt, open a side panel) and what the test reads back (panel text, notifications,
  page errors that OHIF's error boundary would otherwise swallow).
"""

from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DICOMWEB_PREFIX = "/dicom-web"
DATA_SOURCE = "orthanc"

MIME_TYPES = {
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".wasm": "application/wasm",
    ".css": "text/css",
    ".html": "text/html; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
    ".map": "application/json",
    ".txt": "text/plain; charset=utf-8",
}

# Request headers passed on to Orthanc, and answer headers passed back (hop-by-hop ones are not).
FORWARDED_REQUEST_HEADERS = ("accept", "content-type", "content-length")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authenticate",
              "proxy-authorization", "content-length"}


def app_config_js() -> str:
    """OHIF's ``window.config``: one DICOMweb data source on this same origin, no dialogs."""
    root = DICOMWEB_PREFIX
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": DATA_SOURCE,
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": DATA_SOURCE,
            "configuration": {
                "friendlyName": "Orthanc (test)",
                "name": DATA_SOURCE,
                "qidoRoot": root,
                "wadoRoot": root,
                "wadoUriRoot": root,
                "qidoSupportsIncludeField": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "staticWado": False,
                "singlepart": "bulkdata,video",
                "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
                "omitQuotationForMultipartRequest": True,
            },
        }],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class OhifServer:
    """OHIF's static app plus a same-origin proxy to a DICOMweb server, on 127.0.0.1:``port``."""

    def __init__(self, dist: Path, dicomweb_url: str, port: int):
        self.dist = dist.resolve()
        upstream = urllib.parse.urlsplit(dicomweb_url.rstrip("/"))
        self.upstream_host, self.upstream_port = upstream.hostname, upstream.port or 80
        self.upstream_path = upstream.path  # e.g. /dicom-web
        self.port = port
        self.config_js = app_config_js().encode()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request, for diagnosis
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "OhifServer":
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ohif-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread:
            self._thread.join(timeout=10)

    def failed_requests(self) -> list[str]:
        return [f"{method} {path} -> {status}" for method, path, status in list(self.requests) if status >= 400]


class _Handler(BaseHTTPRequestHandler):
    owner: OhifServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _record(self, status: int) -> None:
        self.owner.requests.append((self.command, self.path, status))

    # -- dispatch -------------------------------------------------------------------------------
    def do_GET(self):
        self._route()

    def do_HEAD(self):
        self._route()

    def do_POST(self):
        self._route()

    def do_PUT(self):
        self._route()

    def do_DELETE(self):
        self._route()

    def do_OPTIONS(self):
        self._route()

    def _route(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            if path == DICOMWEB_PREFIX or path.startswith(DICOMWEB_PREFIX + "/"):
                self._proxy()
            elif self.command in ("GET", "HEAD"):
                self._static(urllib.parse.unquote(path))
            else:
                self._send_bytes(405, b"method not allowed", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- static app -----------------------------------------------------------------------------
    def _static(self, path: str) -> None:
        if path == "/app-config.js":
            self._send_bytes(200, self.owner.config_js, MIME_TYPES[".js"])
            return
        dist = self.owner.dist
        target = (dist / path.lstrip("/")).resolve()
        if dist not in target.parents and target != dist:
            self._send_bytes(403, b"forbidden", "text/plain")
            return
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            if "." in path.rsplit("/", 1)[-1]:
                self._send_bytes(404, b"not found", "text/plain")
                return
            target = dist / "index.html"  # the app's own routes: /viewer, /segmentation, ...
        if target.name == "sw.js":  # no service worker: every run must see the files served now
            self._send_bytes(404, b"no service worker in tests", "text/plain")
            return
        ctype = MIME_TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send_bytes(200, target.read_bytes(), ctype, cache=target.name != "index.html")

    def _send_bytes(self, status: int, body: bytes, ctype: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status)

    # -- DICOMweb proxy -------------------------------------------------------------------------
    def _proxy(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream_path = owner.upstream_path + self.path[len(DICOMWEB_PREFIX):]
        headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
        conn = http.client.HTTPConnection(owner.upstream_host, owner.upstream_port, timeout=120)
        try:
            conn.request(self.command, upstream_path, body=body, headers=headers)
            resp = conn.getresponse()
            self.send_response(resp.status, resp.reason)
            for key, value in resp.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            declared = resp.getheader("Content-Length")
            chunked = declared is None and self.command != "HEAD" and resp.status not in (204, 304)
            if declared is not None:
                self.send_header("Content-Length", declared)
            elif chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", "0")
            self.end_headers()
            while self.command != "HEAD":
                chunk = resp.read(256 * 1024)
                if not chunk:
                    break
                if chunked:
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                else:
                    self.wfile.write(chunk)
            if chunked:
                self.wfile.write(b"0\r\n\r\n")
            self._record(resp.status)
        except OSError as exc:
            self._send_bytes(502, f"upstream error: {exc}".encode(), "text/plain")
        finally:
            conn.close()


# ------------------------------------------------------------------------------------------------
# Chromium over the DevTools protocol


class CdpError(RuntimeError):
    pass


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Chromium:
    """A headless Chromium and a CDP session on its one page."""

    def __init__(self, binary: str, profile: Path, width: int = 1600, height: int = 1000):
        import websocket  # websocket-client; the test checks it is installed before getting here

        self.profile = profile
        profile.mkdir(parents=True, exist_ok=True)
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        self.log_path = profile.parent / f"{profile.name}-chromium.log"
        self._next_id = 0
        self.console: list[str] = []  # console.error/warn calls, uncaught exceptions, browser log errors
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [
                binary, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                "--ignore-gpu-blocklist", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--disable-component-update",
                "--disable-dev-shm-usage", "--disable-background-timer-throttling",
                "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows",
                "--mute-audio", "--hide-scrollbars", f"--window-size={width},{height}", "about:blank",
            ],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.ws = None
        try:
            self._connect(websocket, port_file, width, height)
        except BaseException:
            self.close()
            raise

    def _connect(self, websocket, port_file: Path, width: int, height: int) -> None:
        deadline = time.time() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self.log_tail()}")
            if time.time() > deadline:
                raise RuntimeError(f"chromium wrote no DevToolsActivePort in 60 s: {self.log_tail()}")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])
        targets = []
        while not targets:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=10) as resp:
                targets = [t for t in json.loads(resp.read()) if t.get("type") == "page"]
            if not targets:
                if time.time() > deadline:
                    raise RuntimeError(f"chromium opened no page in 60 s: {self.log_tail()}")
                time.sleep(0.1)
        # no Origin header: Chromium refuses DevTools websockets from origins it was not told to allow
        self.ws = websocket.create_connection(targets[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True,
                                              enable_multithread=True)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Log.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- protocol -----------------------------------------------------------------------------
    def call(self, method: str, params: dict | None = None, timeout: float = 60):
        self._next_id += 1
        call_id = self._next_id
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        deadline = time.time() + timeout
        while True:
            self.ws.settimeout(max(0.1, deadline - time.time()))
            try:
                message = json.loads(self.ws.recv())
            except Exception as exc:  # websocket timeout or closed
                raise CdpError(f"{method}: no answer ({exc!r})") from exc
            if message.get("id") == call_id:
                if "error" in message:
                    raise CdpError(f"{method}: {message['error']}")
                return message.get("result", {})
            self._event(message)

    def _event(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            text = " ".join(_remote_text(arg) for arg in params.get("args", []))
            self.console.append(f"console.{params['type']}: {text[:500]}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            exc = details.get("exception", {})
            self.console.append(f"uncaught: {details.get('text', '')} {exc.get('description', '')[:500]}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            if entry.get("level") in ("error", "warning"):
                self.console.append(f"log.{entry['level']}: {entry.get('text', '')[:300]} {entry.get('url', '')}")

    def console_errors(self) -> list[str]:
        self.pump()
        return [line for line in self.console if not line.startswith(("console.warning", "log.warning"))]

    def pump(self) -> None:
        """Reads the events waiting on the socket."""
        self.evaluate("0")

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression (awaited if a promise), as JSON."""
        result = self.call("Runtime.evaluate", {
            "expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": True,
            "timeout": int(timeout * 1000),
        }, timeout=timeout + 5)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CdpError(f"JavaScript failed: {text}\n--- in:\n{expression[:1500]}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, what: str, interval: float = 0.5):
        """Polls a JavaScript expression until it is truthy; returns its value."""
        deadline = time.time() + timeout
        last_error = None
        while time.time() < deadline:
            try:
                value = self.evaluate(expression, timeout=max(5.0, deadline - time.time()))
                if value:
                    return value
            except CdpError as exc:
                last_error = exc
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}" + (f" (last error: {last_error})" if last_error else ""))

    def navigate(self, url: str) -> None:
        result = self.call("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {result['errorText']}")

    def add_script_on_new_document(self, source: str) -> None:
        self.call("Page.addScriptToEvaluateOnNewDocument", {"source": source})

    def double_click(self, x: float, y: float) -> None:
        """A real mouse double click at page coordinates (CSS pixels)."""
        self._mouse("mouseMoved", x, y)
        for count in (1, 2):
            self._mouse("mousePressed", x, y, count)
            self._mouse("mouseReleased", x, y, count)

    def click(self, x: float, y: float) -> None:
        self._mouse("mouseMoved", x, y)
        self._mouse("mousePressed", x, y, 1)
        self._mouse("mouseReleased", x, y, 1)

    def _mouse(self, kind: str, x: float, y: float, count: int = 0) -> None:
        event = {"type": kind, "x": x, "y": y}
        if count:
            event.update(button="left", clickCount=count)
        self.call("Input.dispatchMouseEvent", event)

    def screenshot(self, *paths: Path) -> list[Path]:
        data = base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return list(paths)

    def close(self) -> None:
        ws, self.ws = self.ws, None
        if ws is not None:
            self.ws = ws
            try:
                self.call("Browser.close", timeout=5)
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - it is going away either way
                pass
            self.ws = None
            try:
                ws.close()
            except Exception:  # noqa: BLE001
                pass
        try:  # the whole process group: renderer, GPU and utility processes
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._log.close()


def _remote_text(arg: dict) -> str:
    if "value" in arg:
        return str(arg["value"])
    return arg.get("description") or arg.get("unserializableValue") or arg.get("type", "")


# ------------------------------------------------------------------------------------------------
# OHIF, as a user drives it

# Runs in the page before OHIF's own scripts, on every navigation.
PAGE_HOOKS_JS = r"""
(() => {
  // no onboarding tour over the viewport (OHIF shows it once per browser profile)
  try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) {}
  const record = (list, item) => { window[list] = window[list] || []; window[list].push(item); };
  // OHIF's error boundary calls preventDefault() on these: keep them, they explain blank viewports
  window.addEventListener('error', e => record('__pwPageErrors',
    'error: ' + ((e.error && e.error.stack) || e.message)), true);
  window.addEventListener('unhandledrejection', e => record('__pwPageErrors',
    'unhandled rejection: ' + ((e.reason && e.reason.stack) || e.reason)), true);
  // every notification OHIF is asked to show, whether or not its toast is still on screen
  const hook = setInterval(() => {
    const service = window.services && window.services.uiNotificationService;
    if (!service || service.__pwHooked) return;
    const show = service.show.bind(service);
    service.show = (n) => {
      n = n || {};
      const text = v => (typeof v === 'string' ? v : (v === undefined || v === null ? '' : String(v)));
      record('__pwNotifications', {type: n.type || 'info', title: text(n.title), message: text(n.message)});
      return show(n);
    };
    service.__pwHooked = true;
    clearInterval(hook);
  }, 5);
  // and every toast that reached the DOM
  const seen = new WeakSet();
  new MutationObserver(() => {
    document.querySelectorAll('[data-sonner-toast]').forEach(el => {
      const text = (el.innerText || '').trim();
      if (seen.has(el) || !text) return;
      seen.add(el);
      record('__pwToasts', {type: el.getAttribute('data-type') || '', text});
    });
  }).observe(document, {childList: true, subtree: true, characterData: true});
})();
"""

RIGHT_PANEL_JS = "document.getElementById('viewerLayoutResizableRightPanel')"
RIGHT_PANEL_LINES_JS = f"(({RIGHT_PANEL_JS} || {{}}).innerText || '').split('\\n').map(l => l.trim())"


class OhifViewer:
    """OHIF Viewer in a Chromium page, driven with real mouse events where a user would click."""

    def __init__(self, browser: Chromium, server: OhifServer):
        self.browser = browser
        self.server = server
        browser.add_script_on_new_document(PAGE_HOOKS_JS)

    def js(self, expression: str, timeout: float = 60):
        return self.browser.evaluate(expression, timeout=timeout)

    def wait(self, expression: str, timeout: float, what: str):
        return self.browser.wait_for(expression, timeout, what)

    # -- what a user does ----------------------------------------------------------------------
    def open_study(self, study_uid: str) -> None:
        """The basic viewer on one study, as from a worklist link."""
        self.browser.navigate(f"{self.server.url}/viewer?StudyInstanceUIDs={urllib.parse.quote(study_uid)}")

    def display_set_uid(self, sop_instance_uid: str) -> str | None:
        """OHIF's display set that holds this SOP instance (a SEG, an SR), if it has one yet."""
        return self.js(f"""(() => {{
            const sop = {json.dumps(sop_instance_uid)};
            const ds = (window.services ? window.services.displaySetService.getActiveDisplaySets() : [])
              .find(d => d.SOPInstanceUID === sop || (d.instances || []).some(i => i.SOPInstanceUID === sop));
            return ds ? ds.displaySetInstanceUID : null;
        }})()""")

    def _center(self, element_js: str):
        return self.js(f"""(() => {{
            const e = {element_js};
            if (!e || !e.offsetParent) return null;
            e.scrollIntoView({{block: 'center'}});
            const r = e.getBoundingClientRect();
            return [r.x + r.width / 2, r.y + r.height / 2];
        }})()""")

    def double_click_thumbnail(self, display_set_uid: str) -> None:
        point = self._center(f"document.getElementById({json.dumps('thumbnail-' + display_set_uid)})")
        if not point:
            raise CdpError(f"no visible thumbnail for display set {display_set_uid}")
        self.browser.double_click(*point)

    def visible_button_js(self, text: str) -> str:
        return (f"Array.from(document.querySelectorAll('button'))"
                f".find(b => b.offsetParent && (b.innerText || '').trim() === {json.dumps(text)})")

    def click_button(self, text: str) -> None:
        point = self._center(self.visible_button_js(text))
        if not point:
            raise CdpError(f"no visible button {text!r}")
        self.browser.click(*point)

    def open_right_panel(self, button_cy: str, shown_js: str, timeout: float = 20) -> None:
        """Clicks a right-hand panel's icon (data-cy) until the panel shows what ``shown_js`` checks."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.js(shown_js):
                return
            point = self._center(f"document.querySelector('[data-cy={button_cy}]')")
            if point:
                self.browser.click(*point)
            try:
                self.wait(shown_js, 5, f"the {button_cy} panel")
                return
            except TimeoutError:
                continue
        raise TimeoutError(f"the {button_cy} panel did not open in {timeout:.0f} s")

    # -- what the test reads back --------------------------------------------------------------
    def right_panel_text(self) -> str:
        return self.js(f"(({RIGHT_PANEL_JS} || {{}}).innerText || '')") or ""

    def body_text(self) -> str:
        return self.js("document.body ? document.body.innerText : ''") or ""

    def notification_mark(self) -> tuple[int, int]:
        """Where the notification records stand now; ``notifications(since=mark)`` gives the newer ones."""
        return tuple(self.js("[(window.__pwNotifications || []).length, (window.__pwToasts || []).length]") or (0, 0))

    def notifications(self, since: tuple[int, int] = (0, 0)) -> list[dict]:
        """Notifications OHIF showed: from its notification service and from the DOM toasts."""
        shown = (self.js("window.__pwNotifications || []") or [])[since[0]:]
        toasts = (self.js("window.__pwToasts || []") or [])[since[1]:]
        return ([{"source": "uiNotificationService", **n} for n in shown]
                + [{"source": "toast", "type": t.get("type", ""), "title": "", "message": t.get("text", "")}
                   for t in toasts])

    def page_errors(self) -> list[str]:
        return self.js("window.__pwPageErrors || []") or []

    def screenshot(self, *paths: Path) -> list[Path]:
        return self.browser.screenshot(*paths)

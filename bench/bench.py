#!/usr/bin/env python3
"""odata-auth-proxy benchmark: the proxy against nginx, a naive aiohttp proxy and no proxy at all.

Everything runs on loopback in one go (see README.md in this folder):

* an HTTPS upstream (nginx, 1 worker, trustme certificate) with a ~1 KB OData-like JSON, a large zero
  file and an upload location that streams into a sink which reads every byte;
* a token server (``backend.py``) that counts token requests and validates tokens for the "strict"
  upstream used by the token-rotation pass;
* the five ways to reach the upstream: ``direct`` (wrk/curl → nginx over HTTPS with the token header),
  ``proxy`` (odata-auth-proxy), ``proxy-w2`` (odata-auth-proxy ``--workers 2``: one shared token),
  ``nginx`` (an nginx reverse proxy injecting a static token) and ``naive`` (``naive_proxy.py``).

Run it through ``bench/run`` (installs nginx, wrk and the venv); ``bench/run --help`` for options.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENV_BIN = Path(sys.executable).parent

CLIENT_ID = "bench-client"
CLIENT_SECRET = "bench-secret-not-a-real-one"
STATIC_TOKEN = "bench-static"
SMALL_PATH = "/api/v1/IntegrationPackages?$format=json"
LARGE_PATH = "/api/v1/large"
UPLOAD_PATH = "/upload"

TARGETS = ("direct", "proxy", "proxy-w2", "nginx", "naive")
PROXIES = ("proxy", "proxy-w2")  # the odata-auth-proxy instances (each fetches its own token)
TARGET_LABEL = {
    "direct": "direct",
    "proxy": "odata-auth-proxy",
    "proxy-w2": "odata-auth-proxy, 2 workers",
    "nginx": "nginx proxy",
    "naive": "naive aiohttp",
}
TARGET_ALIASES = {
    "odata-auth-proxy": "proxy",
    "odata": "proxy",
    "nginx-proxy": "nginx",
    "w2": "proxy-w2",
    "workers": "proxy-w2",
}
TESTS = ("get", "download", "upload", "rotation")
TEST_ALIASES = {"small": "get", "tokens": "rotation", "token": "rotation"}

MIB = 1024 * 1024
MB = 1_000_000

# The bench's own targets for the proxy (see README.md).
GOAL_GET_VS_NGINX = 0.5
GOAL_GET_VS_NAIVE = 3.0
GOAL_ADDED_P99_MS = 2.0
GOAL_DOWNLOAD_VS_DIRECT = 0.7
GOAL_RSS_GROWTH_MIB = 48.0


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def clean_env() -> dict[str, str]:
    """The environment for every child: no outbound proxy settings (all traffic is loopback)."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Processes:
    """Every long-running child, each in its own process group, stopped (group-wide) on exit or Ctrl-C."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], log_path: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        out = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            cmd,
            stdout=kwargs.pop("stdout", out),
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=kwargs.pop("env", clean_env()),
            **kwargs,
        )
        out.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # the group may still hold children (nginx workers) when the leader went first
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


def run_child(procs: Processes, cmd: list[str], timeout: float, stdin: Any = None) -> subprocess.CompletedProcess[str]:
    """A short-lived measuring child (wrk, curl), registered so Ctrl-C kills it too."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        start_new_session=True,
        env=clean_env(),
        text=True,
    )
    procs.procs.append(("measure", proc))  # type: ignore[arg-type]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        procs.stop(proc)  # type: ignore[arg-type]
        raise RuntimeError(f"{cmd[0]} did not finish within {timeout:.0f} s") from None
    finally:
        procs.procs = [(n, p) for n, p in procs.procs if p is not proc]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_ports(count: int) -> list[int]:
    socks, ports = [], []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log_path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; log:\n{tail(log_path)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s; log:\n{tail(log_path)}")


def wait_http_ok(url: str, proc: subprocess.Popen[bytes], what: str, log_path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; log:\n{tail(log_path)}")
        with contextlib.suppress(OSError):
            with opener.open(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready at {url} within {timeout:.0f} s; log:\n{tail(log_path)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_json(url: str, method: str = "GET") -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with opener.open(req, timeout=5) as resp:
        return json.loads(resp.read())


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """Samples the summed VmRSS of ``pids`` every 50 ms in a thread; ``peak`` and ``baseline`` in KiB."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.baseline = sum(rss_kib(p) for p in pids)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(rss_kib(p) for p in self.pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, sum(rss_kib(p) for p in self.pids))

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.baseline) / 1024


# --------------------------------------------------------------------------- the fixture: files, certs, nginx


def odata_json() -> bytes:
    """About 1 KB of OData v2 JSON, like CPI's IntegrationPackages."""
    results = []
    for i in range(3):
        results.append(
            {
                "__metadata": {
                    "id": f"https://tenant.example/api/v1/IntegrationPackages('Pkg{i}')",
                    "uri": f"https://tenant.example/api/v1/IntegrationPackages('Pkg{i}')",
                    "type": "com.sap.hci.api.IntegrationPackage",
                },
                "Id": f"Pkg{i}",
                "Name": f"Bench package {i}",
                "Version": "1.0.0",
                "ModifiedBy": "bench",
                "CreationDate": "1700000000000",
            }
        )
    return json.dumps({"d": {"results": results}}, indent=1).encode()


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not found:
        raise SystemExit("nginx not found: run bench/run (it installs nginx and wrk)")
    return found


def nginx_common(tmp: Path, name: str) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""  # worker must read the temp dir (mode 0700)
    temp = tmp / f"{name}-temp"
    temp.mkdir(exist_ok=True)
    return f"""{user}worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {temp}/client;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    types {{ }}
    server_tokens off;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
"""


def upstream_conf(tmp: Path, www: Path, ports: dict[str, int], certs: dict[str, Path]) -> str:
    return (
        nginx_common(tmp, "upstream")
        + f"""    sendfile on;
    ssl_certificate {certs["chain"]};
    ssl_certificate_key {certs["key"]};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 1h;
    map $http_authorization $bench_ok {{
        "~^Bearer bench-[A-Za-z0-9-]+$" 1;
        default 0;
    }}
    upstream sink {{ server 127.0.0.1:{ports["sink"]}; keepalive 16; }}
    upstream validator {{ server 127.0.0.1:{ports["token"]}; keepalive 32; }}

    # the upstream API: any bench token is accepted (the token server issues "bench-...")
    server {{
        listen 127.0.0.1:{ports["upstream"]} ssl backlog=4096;
        root {www};
        default_type application/json;
        if ($bench_ok = 0) {{ return 401; }}
        location = {LARGE_PATH} {{ default_type application/octet-stream; }}
        location = {UPLOAD_PATH} {{
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://sink;
        }}
    }}

    # the strict upstream for the token-rotation pass: every request's token is checked with the token
    # server (issued by it and not expired)
    server {{
        listen 127.0.0.1:{ports["strict"]} ssl backlog=4096;
        root {www};
        default_type application/json;
        location / {{ auth_request /_validate; }}
        location = /_validate {{
            internal;
            proxy_pass http://validator/validate;
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""
    )


def reverse_proxy_conf(tmp: Path, ports: dict[str, int], certs: dict[str, Path]) -> str:
    return (
        nginx_common(tmp, "nginx-proxy")
        + f"""    upstream api {{ server 127.0.0.1:{ports["upstream"]}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{ports["nginx"]} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass https://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{ports["upstream"]};
            proxy_set_header Authorization "Bearer {STATIC_TOKEN}";
            proxy_ssl_trusted_certificate {certs["ca"]};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
            proxy_request_buffering off;
            proxy_buffering on;
            proxy_buffers 16 64k;
            proxy_busy_buffers_size 128k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
    )


def proxy_yaml(tmp: Path, name: str, upstream_port: int, token_port: int, certs: dict[str, Path]) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(
        f"""# odata-auth-proxy config written by bench.py
access_log: false
shutdown_timeout: 1
tls:
  ca_bundle: {certs["ca"]}
routes:
  - name: bench
    prefix: /
    upstream: https://127.0.0.1:{upstream_port}
    credentials:
      token_url: http://127.0.0.1:{token_port}/oauth/token
      client_id: {CLIENT_ID}
      client_secret: {CLIENT_SECRET}
"""
    )
    return path


def make_certs(tmp: Path) -> dict[str, Path]:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": tmp / "ca.pem", "chain": tmp / "server-chain.pem", "key": tmp / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    with open(paths["chain"], "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    return paths


# --------------------------------------------------------------------------- measurements


@dataclass
class WrkResult:
    rps: float
    requests: int
    seconds: float
    p50: float  # ms
    p75: float
    p90: float
    p99: float
    non2xx: int
    socket_errors: dict[str, int]

    @property
    def failures(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        raise ValueError(f"unexpected wrk time {value!r}")
    number, unit = float(m.group(1)), m.group(2)
    return number * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}[unit]


def parse_wrk(text: str) -> WrkResult:
    pct = {p: _ms(v) for p, v in re.findall(r"^\s*(50|75|90|99)%\s+(\S+)\s*$", text, re.M)}
    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if not m or "Requests/sec" not in text or len(pct) < 4:
        raise ValueError(f"cannot parse wrk output:\n{text}")
    requests = int(m.group(1))
    seconds = _ms(m.group(2) + m.group(3)) / 1000
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    non2xx_m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True)) if sock else {}
    return WrkResult(
        rps=rps,
        requests=requests,
        seconds=seconds,
        p50=pct["50"],
        p75=pct["75"],
        p90=pct["90"],
        p99=pct["99"],
        non2xx=int(non2xx_m.group(1)) if non2xx_m else 0,
        socket_errors=errors,
    )


@dataclass
class Transfer:
    ok: bool
    status: int
    bytes: int
    seconds: float
    mbps: float  # 10^6 bytes per second
    rss_growth_mib: float | None
    rss_peak_mib: float | None
    note: str = ""
    runs: list[float] = field(default_factory=list)  # MB/s of each run, when repeated


def best_of(runs: list[Transfer]) -> Transfer:
    """The fastest run's speed, the worst run's memory and outcome."""
    best = max(runs, key=lambda t: t.mbps)
    growths = [t.rss_growth_mib for t in runs if t.rss_growth_mib is not None]
    peaks = [t.rss_peak_mib for t in runs if t.rss_peak_mib is not None]
    failed = [t for t in runs if not t.ok]
    return Transfer(
        ok=not failed,
        status=failed[0].status if failed else best.status,
        bytes=best.bytes,
        seconds=best.seconds,
        mbps=best.mbps,
        rss_growth_mib=max(growths) if growths else None,
        rss_peak_mib=max(peaks) if peaks else None,
        note=failed[0].note if failed else "",
        runs=[t.mbps for t in runs],
    )


@dataclass
class Target:
    name: str
    base_url: str  # scheme://host:port, no trailing slash
    headers: list[str] = field(default_factory=list)  # extra request headers (direct: the token)
    curl_tls: list[str] = field(default_factory=list)
    rss_pids: list[int] = field(default_factory=list)  # the process(es) doing the proxying
    proc: subprocess.Popen[bytes] | None = None


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs = Processes()
        self.tmp = Path(tempfile.mkdtemp(prefix="odata-bench-"))
        self.targets: dict[str, Target] = {}
        self.get_results: dict[tuple[str, int], WrkResult] = {}
        self.downloads: dict[str, Transfer] = {}
        self.uploads: dict[str, Transfer] = {}
        self.rotation: dict[str, Any] | None = None
        self.token_requests_main: int | None = None
        self.event_loop: str = "unknown"
        self.profile_notes: list[str] = []
        self.started = time.monotonic()
        self.load_at_start = "?"

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        a = self.args
        tmp = self.tmp
        names = ["upstream", "strict", "token", "sink", "proxy", "proxy-w2", "nginx", "naive", "rotation"]
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        log(f"work dir {tmp}; ports {self.ports}")
        self.certs = make_certs(tmp)
        www = tmp / "www"
        (www / "api/v1").mkdir(parents=True)
        (www / "api/v1/IntegrationPackages").write_bytes(odata_json())
        large = www / "api/v1/large"
        with open(large, "wb") as f:
            f.truncate(a.download_bytes)  # sparse: no disk space, reads as zeros
        # read it once: the first read of a fresh sparse file fills the page cache and runs at half speed,
        # which would handicap whichever target downloads first
        buf = bytearray(8 * MIB)
        with open(large, "rb") as f:
            while f.readinto(buf):
                pass

        backend_log = tmp / "backend.log"
        backend = self.procs.start(
            "backend",
            [
                sys.executable,
                str(HERE / "backend.py"),
                "--token-port",
                str(self.ports["token"]),
                "--sink-port",
                str(self.ports["sink"]),
                "--client-id",
                CLIENT_ID,
                "--client-secret",
                CLIENT_SECRET,
                "--static-token",
                STATIC_TOKEN,
                "--expires-in",
                "3600",
            ],
            backend_log,
        )
        wait_http_ok(self.token_url("/stats"), backend, "token server", backend_log)
        wait_port(self.ports["sink"], backend, "upload sink", backend_log)

        nginx = nginx_binary()
        conf = tmp / "upstream.conf"
        conf.write_text(upstream_conf(tmp, www, self.ports, self.certs))
        up_log = tmp / "upstream.out.log"
        self.upstream = self.procs.start(
            "nginx upstream", [nginx, "-p", str(tmp), "-e", str(tmp / "upstream.error.log"), "-c", str(conf)], up_log
        )
        wait_port(self.ports["upstream"], self.upstream, "nginx upstream", tmp / "upstream.error.log")
        wait_port(self.ports["strict"], self.upstream, "nginx strict upstream", tmp / "upstream.error.log")
        up_workers = children_of(self.upstream.pid)

        selected = a.targets
        if "direct" in selected:
            self.targets["direct"] = Target(
                "direct",
                f"https://127.0.0.1:{self.ports['upstream']}",
                headers=[f"Authorization: Bearer {STATIC_TOKEN}"],
                curl_tls=["--cacert", str(self.certs["ca"])],
                rss_pids=up_workers,
            )
        if "proxy" in selected:
            proc = self.start_proxy("proxy", self.ports["proxy"], self.ports["upstream"])
            self.targets["proxy"] = Target(
                "proxy", f"http://127.0.0.1:{self.ports['proxy']}", rss_pids=[proc.pid], proc=proc
            )
        if "proxy-w2" in selected:
            port = self.ports["proxy-w2"]
            proc = self.start_proxy("proxy-w2", port, self.ports["upstream"], ["--workers", "2"])
            # the supervisor (token broker) and its two workers: memory is counted for all three
            self.targets["proxy-w2"] = Target(
                "proxy-w2", f"http://127.0.0.1:{port}", rss_pids=[proc.pid, *children_of(proc.pid)], proc=proc
            )
        if "nginx" in selected:
            conf = tmp / "nginx-proxy.conf"
            conf.write_text(reverse_proxy_conf(tmp, self.ports, self.certs))
            err = tmp / "nginx-proxy.error.log"
            proc = self.procs.start(
                "nginx proxy", [nginx, "-p", str(tmp), "-e", str(err), "-c", str(conf)], tmp / "nginx-proxy.out.log"
            )
            wait_port(self.ports["nginx"], proc, "nginx reverse proxy", err)
            self.targets["nginx"] = Target(
                "nginx", f"http://127.0.0.1:{self.ports['nginx']}", rss_pids=children_of(proc.pid), proc=proc
            )
        if "naive" in selected:
            naive_log = tmp / "naive.log"
            proc = self.procs.start(
                "naive proxy",
                [
                    sys.executable,
                    str(HERE / "naive_proxy.py"),
                    "--port",
                    str(self.ports["naive"]),
                    "--upstream",
                    f"https://127.0.0.1:{self.ports['upstream']}",
                    "--cafile",
                    str(self.certs["ca"]),
                    "--token",
                    STATIC_TOKEN,
                ],
                naive_log,
            )
            wait_port(self.ports["naive"], proc, "naive proxy", naive_log)
            self.targets["naive"] = Target(
                "naive", f"http://127.0.0.1:{self.ports['naive']}", rss_pids=[proc.pid], proc=proc
            )
        # smoke test every target once: a wrong setup must fail here, loudly, not as a slow benchmark
        for target in self.targets.values():
            result = run_child(
                self.procs,
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *target.curl_tls]
                + [x for h in target.headers for x in ("-H", h)]
                + [target.base_url + SMALL_PATH],
                timeout=30,
            )
            if result.stdout.strip() != "200":
                raise RuntimeError(f"{target.name}: smoke test GET answered {result.stdout!r} {result.stderr}")

    def token_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['token']}{path}"

    def start_proxy(
        self, name: str, port: int, upstream_port: int, extra: tuple[str, ...] | list[str] = ()
    ) -> subprocess.Popen[bytes]:
        config = proxy_yaml(self.tmp, name, upstream_port, self.ports["token"], self.certs)
        log_path = self.tmp / f"{name}.log"
        cmd = [str(VENV_BIN / "odata-auth-proxy"), "run", "--config", str(config), "--listen", f"127.0.0.1:{port}"]
        proc = self.procs.start(name, cmd + list(extra), log_path)
        wait_http_ok(f"http://127.0.0.1:{port}/-/readyz", proc, f"odata-auth-proxy ({name})", log_path)
        if "--workers" in extra:
            # readyz answers as soon as one worker is up: wait until each has its token from the broker
            # ("worker N: route bench: token fp … obtained")
            workers = int(list(extra)[list(extra).index("--workers") + 1])
            deadline = time.monotonic() + 20
            while not all(f"worker {i}: route bench: token" in log_path.read_text() for i in range(1, workers + 1)):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"odata-auth-proxy ({name}): workers did not start; log:\n{tail(log_path)}")
                time.sleep(0.1)
        m = re.search(r"event loop: (\w+)", log_path.read_text(errors="replace"))
        if m:
            self.event_loop = m.group(1)
        return proc

    # ------------------------------------------------------------------ small GETs

    def wrk(self, target: Target, conns: int, duration: int, path: str = SMALL_PATH) -> WrkResult:
        threads = max(1, min(self.args.wrk_threads, conns))
        cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s"]
        for h in target.headers:
            cmd += ["-H", h]
        cmd.append(target.base_url + path)
        result = run_child(self.procs, cmd, timeout=duration + 60)
        if result.returncode != 0:
            raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr}{result.stdout}")
        return parse_wrk(result.stdout)

    def run_gets(self) -> None:
        a = self.args
        # interleaved (all targets at one concurrency, then the next) so drift hits every target alike
        for conns in a.connections:
            for name in TARGETS:
                target = self.targets.get(name)
                if target is None:
                    continue
                if a.warmup > 0:
                    self.wrk(target, conns, a.warmup)
                res = self.wrk(target, conns, a.duration)
                self.get_results[(name, conns)] = res
                log(
                    f"GET {TARGET_LABEL[name]:>16} c={conns:<3} {res.rps:10.0f} req/s  p50 {res.p50:7.2f} ms  "
                    f"p99 {res.p99:7.2f} ms  failures {res.failures}"
                )

    # ------------------------------------------------------------------ transfers

    def download(self, target: Target) -> Transfer:
        size = self.args.download_bytes
        cmd = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download} %{speed_download} %{time_total}"]
        cmd += target.curl_tls + [x for h in target.headers for x in ("-H", h)] + [target.base_url + LARGE_PATH]
        with RssSampler(target.rss_pids) as rss:
            result = run_child(self.procs, cmd, timeout=600)
        return self._transfer(result, size, rss, target)

    def upload(self, target: Target) -> Transfer:
        size = self.args.upload_bytes
        # stdin of unknown length -> curl streams it with Transfer-Encoding: chunked
        feeder = subprocess.Popen(
            ["head", "-c", str(size), "/dev/zero"], stdout=subprocess.PIPE, start_new_session=True
        )
        self.procs.procs.append(("feeder", feeder))
        cmd = ["curl", "-sS", "-o", "/dev/null", "-T", "-", "-X", "POST", "-H", "Expect:"]
        cmd += ["-H", "Content-Type: application/octet-stream"]
        cmd += ["-w", "%{http_code} %{size_upload} %{speed_upload} %{time_total} %header{x-received-bytes}"]
        cmd += target.curl_tls + [x for h in target.headers for x in ("-H", h)] + [target.base_url + UPLOAD_PATH]
        try:
            with RssSampler(target.rss_pids) as rss:
                result = run_child(self.procs, cmd, timeout=600, stdin=feeder.stdout)
        finally:
            if feeder.stdout:
                feeder.stdout.close()
            self.procs.stop(feeder)  # type: ignore[arg-type]
        transfer = self._transfer(result, size, rss, target, upload=True)
        return transfer

    def _transfer(
        self, result: subprocess.CompletedProcess[str], size: int, rss: RssSampler, target: Target, upload: bool = False
    ) -> Transfer:
        fields = result.stdout.split()
        if result.returncode != 0 or len(fields) < 4:
            note = f"curl {result.returncode}: {result.stderr.strip()}"
            return Transfer(False, 0, 0, 0.0, 0.0, None, None, note=note)
        status, nbytes, speed, seconds = int(fields[0]), int(float(fields[1])), float(fields[2]), float(fields[3])
        note = ""
        if upload:
            # curl's size_upload counts the chunked framing too: the sink's count is the truth
            received = int(fields[4]) if len(fields) > 4 and fields[4].isdigit() else -1
            nbytes = received
            speed = received / seconds if seconds > 0 else 0.0
            if received != size:
                note = f"sink received {received} of {size} bytes"
        ok = status in (200, 204) and nbytes == size
        if not upload and nbytes != size:
            note = f"got {nbytes} of {size} bytes"
        if status not in (200, 204):
            note = f"HTTP {status}"
        if not ok and not note:
            note = f"curl said {result.stdout.strip()!r}"
        rss_known = bool(target.rss_pids)
        return Transfer(
            ok=ok,
            status=status,
            bytes=nbytes,
            seconds=seconds,
            mbps=speed / MB,
            rss_growth_mib=rss.growth_mib if rss_known else None,
            rss_peak_mib=rss.peak / 1024 if rss_known else None,
            note=note,
        )

    def run_transfers(self) -> None:
        """Each transfer ``--transfer-runs`` times, targets interleaved, best MB/s kept (the machine is shared:
        one run can lose half its speed to a neighbour's burst). The naive proxy runs once: it is slow and
        holds the whole body in memory."""
        a = self.args
        for test, results, action in (
            ("download", self.downloads, self.download),
            ("upload", self.uploads, self.upload),
        ):
            if test not in a.tests:
                continue
            runs: dict[str, list[Transfer]] = {}
            for i in range(a.transfer_runs):
                for name in TARGETS:
                    if name not in self.targets or (name == "naive" and i > 0):
                        continue
                    t = action(self.targets[name])
                    runs.setdefault(name, []).append(t)
                    log(
                        f"{test:<8} {TARGET_LABEL[name]:>16} {t.mbps:8.1f} MB/s  {t.seconds:6.2f} s  "
                        f"RSS +{t.rss_growth_mib or 0:.1f} MiB  {'ok' if t.ok else 'FAILED ' + t.note}"
                    )
            for name, ts in runs.items():
                results[name] = best_of(ts)

    # ------------------------------------------------------------------ token rotation

    def run_rotation(self) -> None:
        a = self.args
        lifetime = a.token_lifetime
        before = http_json(self.token_url("/stats"))
        http_json(self.token_url(f"/admin?expires_in={lifetime}"), method="POST")
        try:
            started = time.monotonic()
            proc = self.start_proxy("rotation", self.ports["rotation"], self.ports["strict"])
            target = Target("rotation", f"http://127.0.0.1:{self.ports['rotation']}", rss_pids=[proc.pid], proc=proc)
            res = self.wrk(target, 16, a.rotation_duration)
            elapsed = time.monotonic() - started
            self.procs.stop(proc)
        finally:
            http_json(self.token_url("/admin?expires_in=3600"), method="POST")
        after = http_json(self.token_url("/stats"))
        tokens = after["token_requests"] - before["token_requests"]
        rejected = (after["rejected_expired"] - before["rejected_expired"]) + (
            after["rejected_unknown"] - before["rejected_unknown"]
        )
        # at least one token per lifetime is needed; the proxy refreshes at half-life for short tokens
        minimum = math.ceil(elapsed / lifetime)
        maximum = 2 + math.floor(elapsed / (lifetime / 2))
        self.rotation = {
            "wrk": res,
            "lifetime": lifetime,
            "elapsed": elapsed,
            "tokens": tokens,
            "expected_min": minimum,
            "expected_max": maximum,
            "rejected": rejected,
            "rejected_expired": after["rejected_expired"] - before["rejected_expired"],
            "validated": after["validated"] - before["validated"],
        }
        log(
            f"rotation: {res.rps:.0f} req/s, failures {res.failures}, {tokens} tokens in {elapsed:.1f} s "
            f"(expected {minimum}..{maximum}), tokens rejected by the upstream {rejected}"
        )

    # ------------------------------------------------------------------ profile

    def run_profile(self) -> None:
        """py-spy on the proxy during a GET pass at 16 connections and a download (not part of the numbers)."""
        target = self.targets.get("proxy")
        if target is None or target.proc is None:
            return
        out_dir = HERE / "out"
        out_dir.mkdir(exist_ok=True)
        pyspy = str(VENV_BIN / "py-spy")
        for label, action in (
            ("get16", lambda: self.wrk(target, 16, self.args.profile_duration)),
            ("download", lambda: self.repeat(self.args.profile_duration, lambda: self.download(target))),
        ):
            raw = out_dir / f"profile-{label}.txt"
            cmd = [pyspy, "record", "--pid", str(target.proc.pid), "--format", "raw", "--function"]
            cmd += ["--rate", "200", "--nonblocking", "-o", str(raw)]
            spy_log = self.tmp / f"py-spy-{label}.log"
            spy = self.procs.start(f"py-spy {label}", cmd, spy_log)
            time.sleep(1.0)
            spy_started = time.monotonic()
            action()
            # py-spy writes its output on SIGINT
            with contextlib.suppress(ProcessLookupError):
                os.kill(spy.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(30)
            self.procs.stop(spy)
            if not raw.exists():
                self.profile_notes.append(f"py-spy ({label}) wrote nothing: {tail(spy_log, 5)}")
                continue
            self.profile_notes.append(summarize_profile(raw, label, time.monotonic() - spy_started, 200))
            log(f"profile {label} written to {raw}")

    @staticmethod
    def repeat(seconds: float, action: Any) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            action()

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        self.procs.stop_all()
        if self.args.keep:
            log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def summarize_profile(raw: Path, label: str, seconds: float, rate: int, top: int = 12) -> str:
    """Top frames of a py-spy ``--format raw`` profile: self time, inclusive time, and by package."""
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    by_package: dict[str, int] = {}
    total = in_threads = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        if any("concurrent/futures/thread.py" in f or f.startswith("Thread._bootstrap") for f in frames):
            in_threads += count
        leaf = frames[-1]
        self_counts[leaf] = self_counts.get(leaf, 0) + count
        package = frame_package(leaf)
        by_package[package] = by_package.get(package, 0) + count
        for f in set(frames):
            incl_counts[f] = incl_counts.get(f, 0) + count
    if not total:
        return f"### py-spy, {label}: no samples"

    def pct(count: int) -> str:
        return f"{100 * count / total:5.1f}%"

    lines = [
        f"### py-spy, {label}: {total} samples in {seconds:.0f} s at {rate} Hz "
        f"(CPU-active samples only; {pct(in_threads).strip()} of them in worker threads, not the event loop)",
        "",
        "Self time by package: "
        + ", ".join(f"{k} {pct(v).strip()}" for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])[:8]),
        "",
        "Top self time:",
        "",
    ]
    for frame, count in sorted(self_counts.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"- {pct(count)}  {shorten_frame(frame)}")
    lines += ["", "Top inclusive time (project and aiohttp frames below the request handler):", ""]
    shown = 0
    skip = ("proxy/cli.py", "web_protocol.py", "web_app.py", "web_middlewares.py")
    for frame, count in sorted(incl_counts.items(), key=lambda kv: -kv[1]):
        if any(s in frame for s in skip):
            continue
        if "proxy/" in frame or "aiohttp/" in frame or "prometheus_client/" in frame:
            lines.append(f"- {pct(count)}  {shorten_frame(frame)}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(lines)


def frame_package(frame: str) -> str:
    if frame.startswith("Runner.run "):
        return "event loop (C: uvloop, syscalls)"
    m = re.search(r"\((?:.*/)?(?:site-packages/)?([^/()<>]+)/[^/()]+:\d+\)$", frame)
    if "<frozen" in frame:
        return "stdlib"
    if not m:
        return "stdlib"
    top = m.group(1)
    if top in ("proxy",):
        return "proxy (project)"
    if top in ("aiohttp", "yarl", "multidict", "prometheus_client", "uvloop", "propcache", "frozenlist"):
        return top
    return "stdlib" if top in ("asyncio", "concurrent", "urllib", "email", "http", "json", "logging") else top


def shorten_frame(frame: str) -> str:
    return re.sub(r"\(/\S*?/(site-packages|lib/python3\.\d+|main)/", "(", frame)


# --------------------------------------------------------------------------- report


def fmt_ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "–"
    return f"{value / base:.2f}×"


def loadavg() -> str:
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "?"


def machine_info(bench: Bench) -> list[tuple[str, str]]:
    def cmd_first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except OSError:
            return "not found"
        text = (out.stdout + out.stderr).strip().splitlines()
        return text[0] if text else "?"

    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import aiohttp

    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    commit = cmd_first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "proxy", "pyproject.toml"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPUs", f"{os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})"),
        ("CPU model", model),
        ("kernel", platform.release()),
        ("load average (1/5/15 min) at start, at end", f"{bench.load_at_start}; {loadavg()}"),
        ("Python", platform.python_version()),
        ("aiohttp", aiohttp.__version__),
        ("uvloop", uvloop_version),
        ("proxy event loop", f"{bench.event_loop} (from the proxy's start-up banner)"),
        ("nginx", cmd_first_line([nginx_binary(), "-v"]).replace("nginx version: ", "")),
        ("wrk", cmd_first_line(["wrk", "-v"]).split(" Copyright")[0]),
        ("curl", " ".join(cmd_first_line(["curl", "--version"]).split()[:2])),
        ("project commit", commit + (" (proxy/ has uncommitted changes)" if dirty else "")),
    ]


def report(bench: Bench) -> str:
    a = bench.args
    g = bench.get_results
    out: list[str] = []
    mode = "quick (not representative)" if a.quick else "full"
    if a.only:
        mode += f", --only {a.only}"
    out += ["# odata-auth-proxy benchmark results", ""]
    out += [
        f"Mode: **{mode}**; small GETs {a.duration} s each after a {a.warmup} s warm-up, wrk -t{a.wrk_threads}; "
        f"download {a.download_bytes // MIB} MiB, upload {a.upload_bytes // MIB} MiB (chunked), best of "
        f"{a.transfer_runs} runs (naive: 1); "
        f"whole run {time.monotonic() - bench.started:.0f} s. MB = 10^6 bytes.",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    out += [f"| {k} | {v} |" for k, v in machine_info(bench)]
    out.append("")

    if g:
        out += ["## Small GET (~1 KB JSON), keep-alive", ""]
        out += [
            "| target | conns | req/s | × direct | × nginx | × naive | p50 ms | p99 ms | p99 added vs direct "
            "| failed |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for conns in a.connections:
            direct = g.get(("direct", conns))
            nginx = g.get(("nginx", conns))
            naive = g.get(("naive", conns))
            for name in TARGETS:
                r = g.get((name, conns))
                if r is None:
                    continue
                added = f"{r.p99 - direct.p99:+.2f} ms" if direct and name != "direct" else "–"
                out.append(
                    f"| {TARGET_LABEL[name]} | {conns} | {r.rps:,.0f} | {fmt_ratio(r.rps, direct and direct.rps)} | "
                    f"{fmt_ratio(r.rps, nginx and nginx.rps)} | {fmt_ratio(r.rps, naive and naive.rps)} | "
                    f"{r.p50:.2f} | {r.p99:.2f} | {added} | {r.failures} |"
                )
        out += [
            "",
            "wrk is closed-loop: at 16 and 64 connections the servers are saturated, so latency there is mostly "
            "queueing (≈ connections / throughput); the 1-connection rows show the unloaded per-request cost.",
            "",
        ]
        pairs = [(c, g.get(("proxy", c)), g.get(("proxy-w2", c))) for c in a.connections]
        if any(one and two for _, one, two in pairs):
            out += [
                "### odata-auth-proxy: one process vs `--workers 2`",
                "",
                "Same config; with `--workers 2` a supervisor fetches the token once and shares it with two worker "
                "processes on one port (SO_REUSEPORT). wrk, the upstream nginx and the proxy share the same "
                f"{os.cpu_count()} CPUs, so a second worker can only use what they leave.",
                "",
                "| conns | 1 process req/s | 2 workers req/s | × 1 process | p99 ms (1 → 2) |",
                "| ---: | ---: | ---: | ---: | ---: |",
            ]
            for conns, one, two in pairs:
                if one and two:
                    out.append(
                        f"| {conns} | {one.rps:,.0f} | {two.rps:,.0f} | {fmt_ratio(two.rps, one.rps)} | "
                        f"{one.p99:.2f} → {two.p99:.2f} |"
                    )
            out.append("")

    def transfer_table(title: str, results: dict[str, Transfer]) -> None:
        if not results:
            return
        direct = results.get("direct")
        nginx = results.get("nginx")
        out.extend([f"## {title}", ""])
        out.append("| target | MB/s (best) | × direct | × nginx | seconds | all runs MB/s | peak RSS growth | result |")
        out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for name in TARGETS:
            t = results.get(name)
            if t is None:
                continue
            rss = "–" if t.rss_growth_mib is None else f"{t.rss_growth_mib:+.1f} MiB (peak {t.rss_peak_mib:.0f} MiB)"
            if name == "direct" and t.rss_growth_mib is not None:
                rss += " nginx upstream worker"
            out.append(
                f"| {TARGET_LABEL[name]} | {t.mbps:,.1f} | {fmt_ratio(t.mbps, direct and direct.mbps)} | "
                f"{fmt_ratio(t.mbps, nginx and nginx.mbps)} | {t.seconds:.2f} | "
                f"{', '.join(f'{r:,.0f}' for r in t.runs)} | {rss} | "
                f"{'ok' if t.ok else 'FAILED: ' + t.note} |"
            )
        out.append("")

    transfer_table(f"Download {a.download_bytes // MIB} MiB (curl → target; direct over HTTPS)", bench.downloads)
    transfer_table(
        f"Upload {a.upload_bytes // MIB} MiB, streamed chunked (curl -T - → target → nginx → sink)", bench.uploads
    )

    if bench.token_requests_main is not None:
        out += [
            "## Token requests",
            "",
            f"Token requests by the odata-auth-proxy instance(s) of the main passes "
            f"({', '.join(n for n in PROXIES if n in bench.targets)}; 1-hour tokens, so one per "
            f"instance, also with several workers) during the whole run: "
            f"**{bench.token_requests_main}**"
            + (
                f"; plus {bench.rotation['tokens']} by the rotation-pass instance (5-s tokens), "
                f"{bench.token_requests_main + bench.rotation['tokens']} in all."
                if bench.rotation
                else "."
            ),
            "",
        ]
    rot = bench.rotation
    if rot:
        r: WrkResult = rot["wrk"]
        out += [
            f"## Token rotation: small GET, 16 connections, {rot['lifetime']:g}-s tokens, {a.rotation_duration} s",
            "",
            "A fresh proxy instance against a *strict* upstream: nginx checks every request's token with the token "
            "server (`auth_request`), which refuses tokens it did not issue or that have expired. The proxy "
            "retries once after a 401, so a refused token would be invisible to wrk; it is counted at the "
            "token server instead.",
            "",
            "| req/s | failed (non-2xx + socket errors) | tokens fetched | expected | tokens refused by upstream |",
            "| ---: | ---: | ---: | ---: | ---: |",
            f"| {r.rps:,.0f} | {r.failures} | {rot['tokens']} in {rot['elapsed']:.1f} s | "
            f"{rot['expected_min']}–{rot['expected_max']} | {rot['rejected']} |",
            "",
            "The req/s here is limited by the per-request `auth_request` to the Python token server; it is "
            "not comparable with the table above.",
            "",
        ]

    out += goals(bench)
    if bench.profile_notes:
        out += ["## Profile (py-spy, separate pass, not part of the numbers above)", ""]
        for note in bench.profile_notes:
            out += [note, ""]
    return "\n".join(out).rstrip() + "\n"


def goals(bench: Bench) -> list[str]:
    g = bench.get_results
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("**PASS**" if ok else "**MISS**")

    for conns in (16, 64):
        p, n = g.get(("proxy", conns)), g.get(("nginx", conns))
        ok = None if not (p and n) else p.rps >= GOAL_GET_VS_NGINX * n.rps
        nums = f"{p.rps:,.0f} vs nginx {n.rps:,.0f} req/s = {p.rps / n.rps:.2f}×" if p and n else "not measured"
        rows.append((f"small GET ≥ {GOAL_GET_VS_NGINX}× nginx at {conns} connections", verdict(ok), nums))
    for conns in (16, 64):
        p, n = g.get(("proxy", conns)), g.get(("naive", conns))
        ok = None if not (p and n) else p.rps >= GOAL_GET_VS_NAIVE * n.rps
        nums = f"{p.rps:,.0f} vs naive {n.rps:,.0f} req/s = {p.rps / n.rps:.1f}×" if p and n else "not measured"
        rows.append((f"small GET ≥ {GOAL_GET_VS_NAIVE:g}× naive at {conns} connections", verdict(ok), nums))
    p, d = g.get(("proxy", 16)), g.get(("direct", 16))
    if p and d:
        added = p.p99 - d.p99
        rows.append(
            (
                f"p99 added latency ≤ {GOAL_ADDED_P99_MS:g} ms over direct at 16 connections",
                verdict(added <= GOAL_ADDED_P99_MS),
                f"p99 {p.p99:.2f} ms vs direct {d.p99:.2f} ms = {added:+.2f} ms",
            )
        )
    else:
        rows.append((f"p99 added latency ≤ {GOAL_ADDED_P99_MS:g} ms over direct at 16 connections", "n/a", "–"))
    pd, dd = bench.downloads.get("proxy"), bench.downloads.get("direct")
    if pd and dd and dd.mbps:
        rows.append(
            (
                f"download ≥ {GOAL_DOWNLOAD_VS_DIRECT}× direct",
                verdict(pd.ok and pd.mbps >= GOAL_DOWNLOAD_VS_DIRECT * dd.mbps),
                f"{pd.mbps:,.0f} vs direct {dd.mbps:,.0f} MB/s = {pd.mbps / dd.mbps:.2f}×",
            )
        )
    else:
        rows.append((f"download ≥ {GOAL_DOWNLOAD_VS_DIRECT}× direct", "n/a", "–"))
    if pd and pd.rss_growth_mib is not None:
        rows.append(
            (
                f"peak RSS growth during the download ≤ {GOAL_RSS_GROWTH_MIB:g} MiB",
                verdict(pd.rss_growth_mib <= GOAL_RSS_GROWTH_MIB),
                f"{pd.rss_growth_mib:+.1f} MiB (peak {pd.rss_peak_mib:.0f} MiB)",
            )
        )
    else:
        rows.append((f"peak RSS growth during the download ≤ {GOAL_RSS_GROWTH_MIB:g} MiB", "n/a", "–"))
    # failures of every proxied request the bench made through odata-auth-proxy
    failed = 0
    parts = []
    measured = False
    for (name, conns), r in g.items():
        if name in PROXIES:
            measured = True
            failed += r.failures
            parts.append(f"GET{' (2 workers)' if name == 'proxy-w2' else ''} c={conns}: {r.failures}")
    for label, results in (("download", bench.downloads), ("upload", bench.uploads)):
        for name in PROXIES:
            t = results.get(name)
            if t is not None:
                measured = True
                failed += 0 if t.ok else 1
                parts.append(f"{label}{' (2 workers)' if name == 'proxy-w2' else ''}: {0 if t.ok else 1}")
    rot = bench.rotation
    if rot:
        measured = True
        failed += rot["wrk"].failures + rot["rejected"]
        parts.append(f"rotation: {rot['wrk'].failures} (+{rot['rejected']} refused tokens)")
        token_ok = rot["expected_min"] <= rot["tokens"] <= rot["expected_max"]
    rows.append(
        (
            "zero failed requests, including across token rotation",
            verdict(failed == 0 if measured else None),
            f"{failed} failed ({'; '.join(parts)})" if measured else "–",
        )
    )
    if rot:
        rows.append(
            (
                f"token refreshes with {rot['lifetime']:g}-s tokens as expected",
                verdict(token_ok),
                f"{rot['tokens']} tokens in {rot['elapsed']:.1f} s, "
                f"expected {rot['expected_min']}–{rot['expected_max']}",
            )
        )
    lines = ["## Targets", "", "| target | verdict | numbers |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines.append("")
    return lines


# --------------------------------------------------------------------------- main


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*([KMG]i?B?|)", text.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64M, 1G)")
    unit = m.group(2)[:1].upper()
    return int(m.group(1)) * {"": 1, "K": 1024, "M": MIB, "G": 1024 * MIB}[unit]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench/run",
        description="Benchmark odata-auth-proxy against direct access, an nginx reverse proxy and a naive "
        "aiohttp proxy, all on loopback. Writes Markdown results (bench/RESULTS.md for a full run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="2-s runs, 1-s warm-up, 64 MiB transfers, 6-s rotation")
    p.add_argument(
        "--only",
        metavar="NAME,...",
        help=f"targets ({', '.join(TARGETS)}; odata-auth-proxy = proxy) and/or tests ({', '.join(TESTS)}); "
        "a list of only tests runs them for every target and vice versa",
    )
    p.add_argument("--duration", type=int, help="seconds per small-GET run (default 10, quick 2)")
    p.add_argument("--warmup", type=int, help="warm-up seconds before each small-GET run (default 2, quick 1)")
    p.add_argument("--connections", default="1,16,64", help="small-GET concurrency levels")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (the machine may have few cores)")
    p.add_argument("--download-size", type=parse_size, help="download size (default 1G, quick 64M)")
    p.add_argument("--upload-size", type=parse_size, help="upload size (default 256M, quick 64M)")
    p.add_argument(
        "--transfer-runs", type=int, default=3, help="runs of each download/upload, best kept (naive: always 1)"
    )
    p.add_argument("--token-lifetime", type=float, default=5.0, help="token lifetime in the rotation pass (s)")
    p.add_argument("--rotation-duration", type=int, help="seconds of the rotation pass (default 15, quick 6)")
    p.add_argument("--profile", action="store_true", help="also profile the proxy with py-spy (separate pass)")
    p.add_argument("--profile-duration", type=int, default=5, help="seconds of the profiled GET pass")
    p.add_argument("--out", type=Path, help="Markdown output (default bench/RESULTS.md, or bench/out/ when partial)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    a = p.parse_args(argv)
    a.duration = a.duration or (2 if a.quick else 10)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    a.download_bytes = a.download_size or (64 * MIB if a.quick else 1024 * MIB)
    a.upload_bytes = a.upload_size or (64 * MIB if a.quick else 256 * MIB)
    a.rotation_duration = a.rotation_duration or (6 if a.quick else 15)
    a.connections = [int(c) for c in a.connections.split(",") if c.strip()]
    targets, tests = [], []
    for raw in (a.only or "").split(","):
        name = raw.strip().lower()
        if not name:
            continue
        name = TARGET_ALIASES.get(name, TEST_ALIASES.get(name, name))
        if name in TARGETS:
            targets.append(name)
        elif name in TESTS:
            tests.append(name)
        else:
            p.error(f"--only: unknown name {raw!r} (targets: {', '.join(TARGETS)}; tests: {', '.join(TESTS)})")
    a.targets = targets or list(TARGETS)
    a.tests = tests or list(TESTS)
    if "rotation" in a.tests and "proxy" not in a.targets:
        a.tests.remove("rotation")
    if a.out is None:
        a.out = HERE / "RESULTS.md" if not (a.quick or a.only) else HERE / "out" / "RESULTS-partial.md"
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("wrk", "curl"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} not found: run bench/run (it installs nginx and wrk)")

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # explicit handlers: SIGINT may arrive ignored (started in the background) and Ctrl-C must still clean up
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_term)
    bench = Bench(args)
    bench.load_at_start = loadavg()
    try:
        bench.setup()
        if "get" in args.tests:
            bench.run_gets()
        bench.run_transfers()
        if any(name in bench.targets for name in PROXIES):
            bench.token_requests_main = http_json(bench.token_url("/stats"))["token_requests"]
        if "rotation" in args.tests:
            bench.run_rotation()
        if args.profile:
            bench.run_profile()
        text = report(bench)
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        bench.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

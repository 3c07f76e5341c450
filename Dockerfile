# odata-auth-proxy as a container, e.g. a sidecar next to an app that speaks plain HTTP only.
#
#   docker build -t odata-auth-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#     -e ODATA_AUTH_PROXY_SERVICE_KEY_JSON="$(cat service-key.json)" \
#     -e ODATA_AUTH_PROXY_INBOUND_API_KEY="$(openssl rand -hex 32)" \
#     odata-auth-proxy
#
# Listening on 0.0.0.0 (needed in a container) exposes the service key's rights to whoever reaches the
# port, so the proxy REFUSES TO START on 0.0.0.0 unless one of these is set:
#   ODATA_AUTH_PROXY_INBOUND_API_KEY=<secret>   every caller must send it (X-Proxy-Api-Key header);
#                                                /-/healthz and /-/readyz stay open for health checks
#   ODATA_AUTH_PROXY_ALLOW_REMOTE=true          no key: only where nothing but your app can reach the port
# Callers that use a service name (http://odata-proxy:8080) also need ODATA_AUTH_PROXY_ALLOWED_HOSTS=odata-proxy.

# The base of both stages: --build-arg PYTHON_IMAGE=... for another Debian-based Python >= 3.11 that behaves like the
# official image (python and pip on PATH, pip may install into the system, useradd). ci/container-image.sh builds
# the image with podman on a local stand-in made from Debian packages, for machines that reach no registry.
ARG PYTHON_IMAGE=python:3.12-slim

# ---- build stage: the project and its dependencies as wheels --------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# A C compiler (and Python's headers, where the base image lacks them) so that the wheel has the request path
# compiled with mypyc (setup.py; about twice the requests per CPU second). Build stage only: the final image has
# no compiler. Where apt cannot reach a mirror the build goes on, and the wheel is pure Python (same behaviour,
# slower); the proxy's start-up banner says which it runs.
RUN headers=$(python -c "import os, sysconfig; print(os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))") \
 && extra=$([ "$headers" = True ] || echo python3-dev) \
 && { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        gcc libc6-dev $extra >/dev/null && rm -rf /var/lib/apt/lists/*) \
      || echo "no C compiler: the request path will run as pure Python"; }
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN pip wheel --wheel-dir /wheels .

# ---- final stage: the wheels installed, no sources, no build tools ----------------------------------------------
FROM ${PYTHON_IMAGE}
# The user and its group are both 10001 and both exist (uid and gid named numerically below, so that Kubernetes'
# runAsNonRoot can verify them). Not called "proxy": Debian-based images already have that system user (uid 13).
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels odata-auth-proxy \
 && groupadd --system --gid 10001 odata-auth-proxy \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
      odata-auth-proxy

# 0.0.0.0 requires ODATA_AUTH_PROXY_INBOUND_API_KEY or ODATA_AUTH_PROXY_ALLOW_REMOTE=true (see above)
ENV ODATA_AUTH_PROXY_LISTEN=0.0.0.0:8080 \
    ODATA_AUTH_PROXY_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

USER 10001:10001
EXPOSE 8080

# No curl in -slim: Python's urllib. It asks the admin port when ODATA_AUTH_PROXY_ADMIN_LISTEN is set, else the
# main one (ODATA_AUTH_PROXY_LISTEN); ProxyHandler({}) so that an HTTP_PROXY meant for the upstream never
# catches the health check of 127.0.0.1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; e = os.environ; port = (e.get('ODATA_AUTH_PROXY_ADMIN_LISTEN') or e.get('ODATA_AUTH_PROXY_LISTEN') or ':8080').rpartition(':')[2]; u.build_opener(u.ProxyHandler({})).open(f'http://127.0.0.1:{port}/-/healthz', timeout=4)"]

# exec form: the proxy is PID 1 and gets SIGTERM itself (drains for up to ODATA_AUTH_PROXY_SHUTDOWN_TIMEOUT, 30 s;
# give `docker stop -t 35` / terminationGracePeriodSeconds: 35). SIGHUP reloads a mounted config and key files.
ENTRYPOINT ["odata-auth-proxy", "run"]

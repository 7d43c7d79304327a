# The hub as a small production image: `docker build -t hub .`
#
# Build stage: install the hub and its runtime dependencies (no extras: no
# embedded servers, no test tools) into a virtual environment. Runtime stage:
# that environment on a clean base, run as an unprivileged user.

FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/hub
WORKDIR /src
# hub/schema.sql links to ../schema.sql; both are copied so the package gets it.
COPY pyproject.toml README.md schema.sql ./
COPY hub/ hub/
RUN /opt/hub/bin/pip install . \
    && /opt/hub/bin/python -c "import importlib.resources as r; assert 'CREATE TABLE' in r.files('hub').joinpath('schema.sql').read_text()"

FROM python:3.11-slim
RUN groupadd --system --gid 10001 hub \
    && useradd --system --uid 10001 --gid hub --home-dir /home/hub --create-home \
       --shell /usr/sbin/nologin hub
COPY --from=build /opt/hub /opt/hub
ENV PATH=/opt/hub/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HUB_HOST=0.0.0.0 \
    HUB_PORT=8080
USER hub
WORKDIR /home/hub
EXPOSE 8080
# Liveness only: the process answers HTTP. Readiness (database reachable) is
# GET /health; see docs/DEPLOY.md.
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/live' % os.environ.get('HUB_PORT', '8080'), timeout=2)"]
# SIGTERM starts the graceful drain (1012 to WebSockets, in-flight pushes
# commit); give the container more than HUB_SHUTDOWN_TIMEOUT_S to stop.
STOPSIGNAL SIGTERM
CMD ["hub", "serve"]

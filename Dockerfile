# syntax=docker/dockerfile:1
# Fanout: `docker build -t fanout .`, then `docker run -p 8000:8000 -v fanout-data:/data fanout`.
# See the README's Docker and Scale-out sections.

ARG PYTHON_IMAGE=python:3.11-slim

# --- builder: install the package (and its dependencies) into a virtual environment ---
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/fanout
WORKDIR /src
# Only what the wheel is built from (hatchling reads README.md for the metadata).
COPY pyproject.toml README.md ./
COPY service ./service
COPY migrations ./migrations
# The wheel carries migrations/ as service/migrations (hatch force-include), and
# service.store.db.migrations_dir() must find them there, not in a source tree: checked from /,
# so that /src is not on sys.path.
RUN /opt/fanout/bin/pip install --upgrade pip \
    && /opt/fanout/bin/pip install . \
    && cd / && /opt/fanout/bin/python -c "from service.store.db import migrations_dir; d = migrations_dir(); assert '/site-packages/' in str(d) and any((d / 'versions').glob('*.py')), d"

# --- final: the virtual environment on a slim Python, as a non-root user ---------------
FROM ${PYTHON_IMAGE}

ENV PATH=/opt/fanout/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FANOUT_DATABASE_URL=sqlite+aiosqlite:////data/fanout.db

RUN groupadd --system --gid 10001 fanout \
    && useradd --system --uid 10001 --gid fanout --home-dir /data --shell /usr/sbin/nologin fanout \
    && mkdir -p /data \
    && chown fanout:fanout /data

# Same path as in the builder: the venv's scripts name /opt/fanout/bin/python.
COPY --from=builder /opt/fanout /opt/fanout

USER fanout:fanout
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('FANOUT_PORT', '8000')}/healthz\", timeout=2)"]

# Migrate, then serve; `exec` makes the server PID 1, so SIGTERM reaches it and it drains.
# Arguments after the image name go to `fanout serve` (e.g. `--no-runner`); for a worker,
# `docker run --entrypoint fanout IMAGE worker`.
ENTRYPOINT ["/bin/sh", "-c", "fanout migrate && exec fanout serve --host 0.0.0.0 \"$@\"", "fanout"]
CMD []

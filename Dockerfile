# procqueue processor image. Build: docker build -t procqueue .
# Run:  docker run -e DATABASE_URL=postgresql://... -v $PWD/myapp:/app/myapp procqueue --import myapp.tasks
#       (the working directory /app is on the import path: mount your package inside it)
# The base is pinned to a patch release and distribution; pin its digest too
# (python:...@sha256:...) where a bot such as Renovate keeps it current.
FROM python:3.12.11-slim-bookworm AS build
WORKDIR /src
COPY setup.cfg pyproject.toml README.md schema.sql ./
COPY procqueue ./procqueue
# The symlink procqueue/schema.sql -> ../schema.sql is resolved when the wheel is built.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.12.11-slim-bookworm

# PROCQUEUE_EMBEDDED=0: in a container a missing DATABASE_URL is a mistake, not a cue to
# start a private PostgreSQL that no other pod can see.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROCQUEUE_EMBEDDED=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the wheel reaches this stage: no build tools or source tree in the image.
COPY --from=build /wheels /wheels
# A fixed uid/gid (10001): Kubernetes' runAsNonRoot can only verify a numeric USER, and
# manifests and volume permissions can name it. --no-log-init: a high uid would otherwise
# grow /var/log/lastlog into a sparse file of gigabytes in the layer.
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && groupadd --gid 10001 procqueue \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home procqueue

USER 10001:10001
WORKDIR /app
# Metrics, /healthz, /status and /monitoring. In a container the port is the
# container's own, so unlike on a shared host it can be on by default.
ENV PROCQUEUE_METRICS_PORT=9464
EXPOSE 9464
# The same verdict a Kubernetes livenessProbe gets from procqueue-health (no database).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s CMD ["procqueue-health"]
# The supervisor runs as PID 1: it reaps orphaned processes as init would, and the exec
# form delivers Kubernetes' SIGTERM straight to it for a graceful drain.
ENTRYPOINT ["run-task-processor"]
CMD ["--help"]

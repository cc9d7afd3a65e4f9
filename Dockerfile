# procqueue processor image. Build: docker build -t procqueue .
# Run:  docker run -e DATABASE_URL=postgresql://... -v $PWD/myapp:/app/myapp procqueue --import myapp.tasks
#       (the working directory /app is on the import path: mount your package inside it)
FROM python:3.12-slim

# PROCQUEUE_EMBEDDED=0: in a container a missing DATABASE_URL is a mistake, not a cue to
# start a private PostgreSQL that no other pod can see.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROCQUEUE_EMBEDDED=0 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/procqueue
COPY setup.cfg pyproject.toml README.md schema.sql ./
COPY procqueue ./procqueue
COPY bin ./bin
# The symlink procqueue/schema.sql -> ../schema.sql is resolved when the wheel is built.
RUN pip install . && useradd --create-home --uid 10001 procqueue

USER procqueue
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

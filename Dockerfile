# procqueue processor image. Build: docker build -t procqueue .
# Run:  docker run -e DATABASE_URL=postgresql://... -v $PWD/app:/app procqueue --import app.tasks
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
# The supervisor runs as PID 1: it reaps orphaned processes as init would, and the exec
# form delivers Kubernetes' SIGTERM straight to it for a graceful drain.
ENTRYPOINT ["run-task-processor"]
CMD ["--help"]

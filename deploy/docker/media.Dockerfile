# syntax=docker/dockerfile:1
# dmcall media. Build from the repository root:
#   docker build -f deploy/docker/media.Dockerfile -t dmcall/media:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

# ---- build: a virtual environment with the pinned runtime dependencies, and the code
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
# The [project] dependencies of pyproject.toml (exact pins), in a layer of their own so a
# code change does not reinstall them.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
 && /opt/venv/bin/pip install -r requirements.txt
COPY shared ./shared
COPY services/__init__.py ./services/__init__.py
# A service never imports another: only its own package goes in.
COPY services/media ./services/media
# Bytecode now: the root filesystem is read-only at run time.
RUN /opt/venv/bin/python -m compileall -q /opt/venv shared services

# ---- run: the slim base, the venv and the code; no compilers, no pip cache, not root
FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DMCALL_HOST=0.0.0.0
RUN groupadd --system --gid 10001 dmcall \
 && useradd --system --uid 10001 --gid dmcall --no-create-home --shell /usr/sbin/nologin dmcall
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --from=build /src/shared ./shared
COPY --from=build /src/services ./services
USER 10001:10001
# HTTP (SDP offers, stats); RTP/ICE uses UDP ports chosen at run time.
EXPOSE 8004
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8004/healthz', timeout=2).status != 200)"]
CMD ["python", "-m", "services.media"]

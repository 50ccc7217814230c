# One image for every posflow service; docker-compose.yml picks the subcommand.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Services never need root: a fixed, unprivileged account owns nothing but its home.
RUN groupadd --system --gid 10001 posflow \
    && useradd --system --uid 10001 --gid posflow --create-home --shell /usr/sbin/nologin posflow

WORKDIR /app

# Only what the package build needs (tests, docs and the local stack's data stay out,
# see .dockerignore). pyproject.toml names README.md as the package's readme.
COPY pyproject.toml README.md ./
COPY posflow/ posflow/
COPY cli/ cli/
COPY api/ api/
COPY ingest/ ingest/
COPY streams/ streams/
COPY alerts/ alerts/
COPY simulator/ simulator/
COPY dashboards/ dashboards/
COPY deploy/ deploy/

# Not editable: the image runs the installed package, the copied sources are only its input.
RUN pip install --no-cache-dir . \
    && rm -rf build ./*.egg-info

USER posflow

# `docker run posflow:local api` runs `posflow api`; no subcommand prints the help.
ENTRYPOINT ["posflow"]
CMD ["--help"]

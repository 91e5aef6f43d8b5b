# llm-usage-exporter container image: docker build -t llm-usage-exporter .
# The build stage turns the package and its dependencies into wheels; the runtime stage
# installs only those, runs as an unprivileged user and keeps its SQLite store in /data.

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# .dockerignore limits the context to the package sources and the example config
COPY . .
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin exporter \
 && mkdir -p /data /etc/llm-usage-exporter \
 && chown exporter:exporter /data
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels llm-usage-exporter && rm -rf /wheels
COPY deploy/exporter.yaml /etc/llm-usage-exporter/config.yaml

USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 9473

HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9473/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["llm-usage-exporter"]
# Inside a container the exporter must listen beyond loopback; give it ingest tokens
# (auth_token_file) or, on a private network, --allow-unauthenticated as docker-compose.yml does.
CMD ["serve", "--host", "0.0.0.0", "--port", "9473", "--db", "/data/usage.db", "--config", "/etc/llm-usage-exporter/config.yaml"]

# farmesh-ws: the gateway with its embedded local swarm by default; set FAR_MESH_DHT_BOOTSTRAP
# to join a real mesh instead. Installs exactly as scripts/bootstrap does (runtime set only).
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 farmesh
WORKDIR /app
COPY requirements/ requirements/
COPY pyproject.toml README.md package.json package-lock.json ./
COPY scripts/ scripts/
COPY farmesh_ws/ farmesh_ws/
RUN FARMESH_RUNTIME_ONLY=1 FARMESH_VENV=/opt/venv scripts/bootstrap \
    && rm -rf /root/.cache/pip

ENV PATH=/opt/venv/bin:$PATH \
    FARMESH_HOME=/home/farmesh/.farmesh \
    FARMESH_HOST=0.0.0.0 \
    FARMESH_PORT=8100 \
    FARMESH_AUTH=required
USER farmesh
# The bundled model is converted at build time, so a container starts without that step.
RUN farmesh-ws model prepare --quiet

EXPOSE 8100
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8100/health', timeout=4)"]
CMD ["farmesh-ws", "serve"]

# The cloud side as a container: `cloud-batch` with the cloud and batch (Ray) extras, running as a
# non-root user. Build from the repository root:
#   docker build -f packaging/cloud-batch.Dockerfile -t edgefleet/cloud-batch .
#   docker run --rm -v $PWD/cloud:/data edgefleet/cloud-batch pipeline run --config /data/pipeline.toml
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY edge_agent ./edge_agent
COPY cloud_batch ./cloud_batch
RUN pip install ".[cloud,batch]" && rm -rf /src

RUN useradd --system --uid 10001 --create-home --home-dir /home/edgefleet edgefleet \
    && mkdir -p /data && chown edgefleet:edgefleet /data
USER 10001:10001
WORKDIR /data

ENTRYPOINT ["cloud-batch"]
CMD ["pipeline", "run", "--config", "/data/pipeline.toml", "--no-progress"]

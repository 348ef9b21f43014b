# A lab device: sshd + Python + the runtimes the device-side runner needs (numpy, TVM runtime, onnxruntime).
# Same shape as the test lab's loopback devices (tests/lab.py): key auth only, host key checked by the
# controller's known_hosts, artifacts under /opt/edgedeploy/work.
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends openssh-server python3 python3-venv coreutils ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /run/sshd

# Pinned like pyproject.toml: the runner loads what the controller compiled for.
RUN python3 -m venv /opt/edgedeploy/venv \
 && /opt/edgedeploy/venv/bin/pip install --no-cache-dir \
      numpy==2.4.6 apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post1 onnxruntime==1.31.1

RUN useradd --create-home --shell /bin/bash edge \
 && mkdir -p /opt/edgedeploy/work /home/edge/.ssh \
 && chown -R edge:edge /opt/edgedeploy/work /home/edge/.ssh \
 && chmod 700 /home/edge/.ssh

COPY docker/device-sshd_config /etc/ssh/sshd_config.d/edgedeploy.conf

# The controller's public key is mounted at run time: -v ./lab_key.pub:/home/edge/.ssh/authorized_keys:ro
EXPOSE 22
CMD ["/usr/sbin/sshd", "-D", "-e"]

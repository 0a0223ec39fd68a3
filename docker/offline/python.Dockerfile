# Stand-in for python:3.11-slim: Debian bookworm's Python 3.11 with venv and pip.
# The selflm Dockerfile only needs `python3 -m venv`, `python3`, useradd and CA certificates.
FROM selflm-offline/debian:bookworm
COPY ca/ /usr/local/share/ca-certificates/
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates passwd \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3 /usr/local/bin/python
# pip verifies TLS against the system store, which holds any CA this machine's egress uses.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt
CMD ["python3"]

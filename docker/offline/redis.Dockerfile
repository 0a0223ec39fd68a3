# Stand-in for redis:7: Debian bookworm's Redis 7 with redis-cli, data in /data, port 6379
# on every interface without protected mode (as the registry image runs it).
FROM selflm-offline/debian:bookworm
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
VOLUME /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data"]

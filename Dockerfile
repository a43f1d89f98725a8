# dicom-gateway container: the same `dicom-gateway run` as the systemd unit.
#   docker build -t dicom-gateway .
#   docker run -p 11112:11112 -p 127.0.0.1:8080:8080 -e DICOM_GATEWAY_API_TOKEN=... \
#     -v gateway-data:/var/lib/dicom-gateway dicom-gateway
# Mount your own config at /etc/dicom-gateway/gateway.toml; pass secrets as env vars.
# Ports: 11112 DICOM, 2575 HL7 MLLP (when [hl7] listen_port is set), 8080 admin HTTP.
# `docker kill -s HUP` reloads the configuration.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN groupadd --system dicom-gateway \
    && useradd --system --gid dicom-gateway --home-dir /var/lib/dicom-gateway \
       --shell /usr/sbin/nologin dicom-gateway \
    && install -d -o dicom-gateway -g dicom-gateway /var/lib/dicom-gateway
COPY --from=build /install /usr/local
COPY config/gateway.toml /etc/dicom-gateway/gateway.toml
# Inside a container the admin server listens on every interface of the container's own
# network namespace; what reaches it is decided by `-p` (publish it on loopback, or
# behind TLS). The API still needs the token.
ENV PYTHONUNBUFFERED=1 \
    DICOM_GATEWAY_CONFIG=/etc/dicom-gateway/gateway.toml \
    DICOM_GATEWAY__LOGGING__FORMAT=json \
    DICOM_GATEWAY__HTTP__HOST=0.0.0.0 \
    DICOM_GATEWAY__HTTP__PORT=8080
USER dicom-gateway
WORKDIR /var/lib/dicom-gateway
VOLUME ["/var/lib/dicom-gateway"]
EXPOSE 11112 2575 8080
# Ready = index database, spool disk and object store all answer (503 otherwise).
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=8)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["dicom-gateway"]
CMD ["run", "--config", "/etc/dicom-gateway/gateway.toml"]

# dicom-gateway container: the same `dicom-gateway run` as the systemd unit.
#   docker build -t dicom-gateway .
#   docker run -p 11112:11112 -v gateway-data:/var/lib/dicom-gateway dicom-gateway
# Mount your own config at /etc/dicom-gateway/gateway.toml; pass secrets as env vars.
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
ENV PYTHONUNBUFFERED=1 \
    DICOM_GATEWAY_CONFIG=/etc/dicom-gateway/gateway.toml \
    DICOM_GATEWAY__LOGGING__FORMAT=json
USER dicom-gateway
WORKDIR /var/lib/dicom-gateway
VOLUME ["/var/lib/dicom-gateway"]
EXPOSE 11112
STOPSIGNAL SIGTERM
ENTRYPOINT ["dicom-gateway"]
CMD ["run", "--config", "/etc/dicom-gateway/gateway.toml"]

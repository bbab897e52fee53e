# The image the Kubernetes export runs the proxy (and, for engine: sim, the instances) from:
#   docker build -t epdctl:0.1.0 .
# then `epdctl export k8s FILE --proxy-image epdctl:0.1.0` (the default name).
FROM python:3.11-slim
COPY pyproject.toml README.md /src/
COPY epdctl /src/epdctl
RUN pip install --no-cache-dir '/src[fast]' && rm -rf /src
EXPOSE 10001
CMD ["epdctl", "--help"]

# vLLM's router (vllm-router, a Rust binary in a Python wheel) in front of FMBC worker replicas of either engine:
# the router of docker/kubernetes/router.yaml (docs/scale-out.md says why this router and which flags). No GPU,
# no model, no fmbc-serve: it only forwards OpenAI requests. Build from the repository root:
#   docker build -f docker/router.Dockerfile -t fmbc-serve-router:0.1.17 .
# VLLM_ROUTER_VERSION defaults to the release CI tests (fmbc_serve/versions.py; tests/deploy/test_router_setup.py
# checks that they agree). The image runs `vllm-router`; its flags go after the image name:
#   docker run -p 30000:30000 fmbc-serve-router:0.1.17 --host 0.0.0.0 --port 30000 \
#     --worker-urls http://gpu-1:30000 http://gpu-2:30000 --policy round_robin --health-check-interval-secs 1
FROM python:3.12-slim-bookworm

ARG VLLM_ROUTER_VERSION=0.1.17
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The wheel carries the router and its TLS libraries; `--help` fails the build if the binary does not load.
RUN python3 -m pip install --no-cache-dir "vllm-router==${VLLM_ROUTER_VERSION}" \
    && vllm-router --help >/dev/null

USER 65534:65534
EXPOSE 30000 29000
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://localhost:30000/liveness', timeout=8).status != 200)"]

ENTRYPOINT ["vllm-router"]
CMD ["--help"]

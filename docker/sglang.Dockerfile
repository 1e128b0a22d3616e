# FMBC models in the official SGLang image (GPU). Build from the repository root:
#   docker build -f docker/sglang.Dockerfile -t fmbc-serve-sglang .
# SGLANG_VERSION defaults to the version CI tests (fmbc_serve/versions.py; tests/deploy/test_docker.py checks that
# they agree); --build-arg SGLANG_VERSION=... picks another release. scripts/build-image-buildah.sh builds this file
# on a machine without Docker, against a local base image.
# Serve a checkpoint mounted at /models/fmbc on port 30000 (docs/docker.md):
#   docker run --gpus all --shm-size 32g --ipc=host -p 30000:30000 -v "$PWD/models/fmbc:/models/fmbc:ro" fmbc-serve-sglang
ARG SGLANG_VERSION=0.5.23
FROM lmsysorg/sglang:v${SGLANG_VERSION}

ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    SGLANG_EXTERNAL_MODEL_PACKAGE=fmbc_serve.engines.sglang.models

# Only the package sources (see .dockerignore): a code change leaves the base layers cached.
COPY pyproject.toml README.md /opt/fmbc-serve/
COPY fmbc_serve/ /opt/fmbc-serve/fmbc_serve/
COPY kernels/ /opt/fmbc-serve/kernels/

# --no-deps into the image's own Python, as scripts/venv.sh does for the engine venvs: torch, transformers,
# safetensors and tokenizers come from the image and keep its pins. The check fails the build if the
# installed package lacks the SGLang model package or the engine entry points (a
# subpackage left out of pyproject.toml's package list is only seen here, not in an editable install).
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir --no-deps /opt/fmbc-serve \
    && rm -rf /opt/fmbc-serve/build /opt/fmbc-serve/*.egg-info \
    && python3 -c "from importlib.metadata import distribution; d = distribution('fmbc-serve'); \
files = {str(p) for p in d.files}; groups = {e.group for e in d.entry_points}; \
assert 'fmbc_serve/engines/sglang/models/fmbc.py' in files, 'fmbc_serve.engines.sglang.models is not installed'; \
assert {'sglang.srt.plugins', 'vllm.general_plugins'} <= groups, groups"

EXPOSE 30000
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://localhost:30000/health', timeout=8).status != 200)"]

# No wrapper entrypoint: `docker run IMAGE` runs `fmbc serve` (SGLang's server on all interfaces, as a container
# must, with --enable-metrics for Prometheus /metrics and the engine's API-key check on when the container gets
# FMBC_API_KEY), and `docker run IMAGE python3 -m sglang.launch_server --model-path ... --host 0.0.0.0 --port
# 30000` runs exactly the command given.
ENTRYPOINT []
CMD ["fmbc", "serve", "/models/fmbc", "--engine", "sglang", "--host", "0.0.0.0", "--port", "30000"]

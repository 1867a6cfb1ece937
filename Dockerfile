# One image for the Ray head, the Ray workers, the driver and the dashboard (docker-compose.yml).
#
# torch goes in first, from an index of your choice, so the project's `torch>=2.4` finds it and
# pulls nothing more. The default is PyPI's torch 2.13.0 for Linux x86-64, which brings its own
# CUDA libraries (GPU workers need the NVIDIA container toolkit on the host). A CPU-only image is
# several GB smaller:
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# or set TORCH_VERSION / TORCH_INDEX_URL in .env.
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The dependencies get their own layer, rebuilt only when pyproject.toml (or README.md, which it
# names) changes: install the project once from an empty placeholder package, then remove it.
WORKDIR /src
COPY pyproject.toml README.md ./
RUN mkdir scaling_search && touch scaling_search/__init__.py \
    && pip install . \
    && pip uninstall --yes scaling-search \
    && rm -rf scaling_search build ./*.egg-info
COPY scaling_search/ scaling_search/
RUN pip install --no-deps . && rm -rf build ./*.egg-info

# Study files are read relative to /app; outputs go to /app/runs (a volume shared by all Ray
# nodes in docker-compose.yml, created here so the volume is owned by the unprivileged user).
WORKDIR /app
COPY studies/ studies/
RUN useradd --create-home --uid 1000 app && mkdir -p runs data && chown app runs
USER app

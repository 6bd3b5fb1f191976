# GPU worker image for Dataflow (custom container) and other portable runners.
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/clip-curate:0.1 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/clip-curate:0.1
# then run with --sdk_container_image=REGION-docker.pkg.dev/PROJECT/REPO/clip-curate:0.1 (see docs/scale.md).
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG BEAM_VERSION=2.77.0
FROM apache/beam_python3.11_sdk:${BEAM_VERSION} AS beam_sdk

FROM ${CUDA_BASE}
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3-pip libgl1 libglib2.0-0 ca-certificates && \
    rm -rf /var/lib/apt/lists/* && \
    python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first (CUDA wheels from PyPI), pinned like the README install.
RUN pip install torch==2.14.1 torchvision==0.29.1
COPY . /opt/clip-curate
RUN pip install /opt/clip-curate && python -c "import clip_curate.pipeline, open_clip, apache_beam"
# Beam SDK harness boot entrypoint, copied from the matching Beam SDK image.
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
ENTRYPOINT ["/opt/apache/beam/boot"]

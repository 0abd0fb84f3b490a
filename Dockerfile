# The app's executor image: Flower's SuperExec at the pinned Flower version plus every dependency a
# run config can ask for. It runs the ServerApp next to the SuperLink and each ClientApp next to its
# SuperNode (`--isolation process`, see compose.yaml). The app's code is not in the image: `flwr run`
# ships it with each run. Nothing is installed or downloaded at run time.
#
#   docker build -t flower-app-superexec:0.1.0 .                                  # CPU PyTorch
#   docker build --build-arg EXTRAS=llm -t flower-app-superexec:0.1.0-llm .       # + transformers, peft
#   docker build --build-arg TORCH_VARIANT=cu130 -t flower-app-superexec:0.1.0-cuda .   # CUDA PyTorch
#
# TORCH_VARIANT names PyTorch's wheel index (https://download.pytorch.org/whl/<variant>): cpu, or a
# CUDA build such as cu126 / cu128 / cu130 that the host's NVIDIA driver supports. The CUDA
# libraries come inside those wheels, so the base image stays Flower's; the host needs the NVIDIA
# driver and Container Toolkit, and compose's executors `gpus: all` (README, "CUDA").
FROM flwr/superexec:1.42.0

ARG TORCH_VARIANT=cpu
ARG EXTRAS=""
WORKDIR /app
COPY --chown=app:app pyproject.toml deploy/requirements.py deploy/check_image.py /app/build/

# PyTorch from its own index first (PyPI's wheels pull in CUDA libraries, gigabytes), then the rest
# from PyPI: pyproject's dependencies and, for flwr[simulation,dp], only the extras' requirements
# (ray, dp-accounting) at the versions the base image's Flower declares; Flower itself stays the base
# image's and cannot be replaced. Versions come from pyproject.toml, written once there. The check
# imports every dependency and feature module; a failure fails the build.
RUN python /app/build/requirements.py --pyproject /app/build/pyproject.toml --only torch torchvision \
        > /app/build/torch.txt \
    && python -m pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
        -r /app/build/torch.txt \
    && python /app/build/requirements.py --pyproject /app/build/pyproject.toml \
        --extra "${EXTRAS}" --provided flwr --exclude torch torchvision \
        > /app/build/rest.txt \
    && python -m pip install --no-cache-dir -r /app/build/rest.txt \
    && python -m pip check \
    && python /app/build/check_image.py --pyproject /app/build/pyproject.toml \
        --extra "${EXTRAS}" --torch "${TORCH_VARIANT}" \
    && rm -rf /app/build

# No calls home from the Flower processes; matplotlib's font cache was built above, as this user
# (`app`, uid 49999, from the base image; its working directory /app is where output-dir='outputs'
# lands, compose mounts ./outputs there).
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    MPLBACKEND=Agg

# The executor: flower-app-superexec (deploy/superexec.py) takes flower-superexec's flags and runs
# tasks the same way, except that each ClientApp process is forked from a fork server that imported
# torch and Flower's ClientApp runtime once (README, "Deployment speed: warm ClientApp processes").
# The ServerApp's executor in compose.yaml is Flower's own. The check runs it in the image.
COPY --chmod=755 deploy/superexec.py /usr/local/bin/flower-app-superexec
RUN flower-app-superexec --help > /dev/null

ENTRYPOINT ["flower-app-superexec"]

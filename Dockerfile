# The app's executor image: Flower's SuperExec at the pinned Flower version plus the app's
# dependencies (CPU-only PyTorch). It runs the ServerApp next to the SuperLink and each ClientApp
# next to its SuperNode (`--isolation process`, see compose.yaml). The app's code is not in the
# image: `flwr run` ships it with each run. Nothing is installed or downloaded at run time.
#
#   docker build -t flower-app-superexec:0.1.0 .
#   docker build --build-arg EXTRAS=llm -t flower-app-superexec:0.1.0-llm .   # + transformers, peft
FROM flwr/superexec:1.42.0

ARG EXTRAS=""
WORKDIR /app
COPY --chown=app:app pyproject.toml deploy/requirements.py /app/build/

# PyTorch from its CPU-only index first (the PyPI wheels pull in CUDA libraries, gigabytes), then
# the other dependencies from PyPI. Flower is already in the base image at the pinned version and
# is left out, so it cannot be replaced. Versions come from pyproject.toml, written once there.
RUN python /app/build/requirements.py --pyproject /app/build/pyproject.toml --only torch torchvision \
        > /app/build/torch.txt \
    && python -m pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        -r /app/build/torch.txt \
    && python /app/build/requirements.py --pyproject /app/build/pyproject.toml \
        --extra "${EXTRAS}" --exclude flwr torch torchvision \
        > /app/build/rest.txt \
    && python -m pip install --no-cache-dir -r /app/build/rest.txt \
    && python -m pip check \
    && python -c "import importlib.metadata as md, flwr, torch, torchvision, pandas, sklearn, matplotlib.pyplot; \
assert flwr.__version__ == '1.42.0', flwr.__version__; \
cuda = [d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].lower().startswith('nvidia')]; \
assert not cuda and torch.version.cuda is None, (torch.__version__, cuda)" \
    && rm -rf /app/build

# No calls home from the Flower processes; matplotlib's font cache was built above, as this user.
ENV FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1

ENTRYPOINT ["flower-superexec"]

# qmover: worker, beat, Flower and the CLI share this image.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY qmover ./qmover
RUN pip install --no-cache-dir .
USER nobody
ENTRYPOINT []
CMD ["qmover", "--help"]

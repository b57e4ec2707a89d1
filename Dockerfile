FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# Exactly the runtime dependencies pyproject.toml declares (no dev extras), as CI's fresh install does
# (.ci/fresh_install.py); tests/test_dockerfile.py keeps this line so.
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir .
COPY . .
RUN useradd --create-home hub && mkdir -p /app/var && chown hub /app/var
USER hub
EXPOSE 8000
# gunicorn's configuration is gunicorn.conf.py; inside a container it listens on every interface.
ENV GUNICORN_BIND=0.0.0.0:8000
CMD ["gunicorn", "--config", "gunicorn.conf.py"]

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
# Exactly the runtime dependencies pyproject.toml declares (no dev extras), as CI's fresh install does
# (.ci/fresh_install.py); tests/test_dockerfile.py keeps this line so.
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir .
COPY . .
# The persons' pages' static files, collected under hashed names that WhiteNoise serves (clearinghouse.staticfiles).
# The values below only let the settings load for this one command: collecting files needs no secret, and
# none is kept in the image (the running container reads its own from the environment).
RUN DJANGO_DEBUG=0 DJANGO_SECRET_KEY=collectstatic-only-not-used-to-sign-anything-0123456789 \
    DJANGO_ALLOWED_HOSTS=localhost HUB_ENCRYPTION_KEYS=Y29sbGVjdHN0YXRpYy1vbmx5LXBsYWNlaG9sZGVyLTMy \
    HUB_SUBJECT_KEY=collectstatic-only python manage.py collectstatic --noinput
RUN useradd --create-home hub && mkdir -p /app/var && chown hub /app/var
USER hub
EXPOSE 8000
# gunicorn's configuration is gunicorn.conf.py; inside a container it listens on every interface.
ENV GUNICORN_BIND=0.0.0.0:8000
CMD ["gunicorn", "--config", "gunicorn.conf.py"]

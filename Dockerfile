FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
RUN pip install --no-cache-dir .
COPY . .
RUN useradd --create-home hub && mkdir -p /app/var && chown hub /app/var
USER hub
EXPOSE 8000
CMD ["gunicorn", "clearinghouse.wsgi:application", "--bind", "0.0.0.0:8000", "--workers", "4"]

# pacsworker image: receiver, worker and CLI. GPU hosts: build with
#   --build-arg TORCH_SPEC="torch --index-url <your CUDA wheel index>"
FROM python:3.11-slim
ARG TORCH_SPEC="torch"
ENV PYTHONUNBUFFERED=1 PACSWORKER__STORAGE__DATA_DIR=/data
WORKDIR /app
# dicom3tools: dciodvfy, the IOD validator of the validation gate (without it the gate skips that check)
RUN apt-get update \
    && apt-get install -y --no-install-recommends dicom3tools \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir ${TORCH_SPEC}
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir ".[monitor,brain]" && pip install --no-cache-dir --no-deps "deepbet==1.0.2"
RUN useradd --system --uid 1000 pacsworker && mkdir -p /data && chown pacsworker /data
USER pacsworker
VOLUME ["/data"]
EXPOSE 11112
ENTRYPOINT ["pacsworker"]
CMD ["serve"]

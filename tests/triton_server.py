"""A real Triton Inference Server serving a TorchScript network, for tests/test_triton.py.

Run by the interpreter of the venv that scripts/install-triton-test.sh makes (nvidia-pytriton
bundles the server binary; it runs on CPU): ``triton-venv/bin/python tests/triton_server.py
--network model.ts --name spleen --http-port N --grpc-port N --metrics-port N``. The tensors'
names are this server's own (``ct_tiles`` in, ``spleen_logits`` out): pacsworker reads them from
the model's metadata. SIGINT stops it.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", required=True, help="TorchScript file: (N, 1, x, y, z) -> (N, 2, x, y, z)")
    parser.add_argument("--name", default="spleen")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    network = torch.jit.load(args.network, map_location="cpu").eval()

    @batch
    def infer(ct_tiles: np.ndarray) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return {"spleen_logits": network(torch.from_numpy(ct_tiles)).numpy()}

    config = TritonConfig(
        http_address="127.0.0.1", http_port=args.http_port,
        grpc_address="127.0.0.1", grpc_port=args.grpc_port,
        metrics_address="127.0.0.1", metrics_port=args.metrics_port,
        exit_on_error=True,
        exit_timeout_secs=3,  # a client's idle keep-alive connection would hold the exit for 30 s
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            model_version=args.version,
            infer_func=infer,
            inputs=[Tensor(name="ct_tiles", dtype=np.float32, shape=(1, -1, -1, -1))],
            outputs=[Tensor(name="spleen_logits", dtype=np.float32, shape=(2, -1, -1, -1))],
            config=ModelConfig(max_batch_size=args.max_batch_size),
            strict=True,
        )
        triton.serve()


if __name__ == "__main__":
    main()

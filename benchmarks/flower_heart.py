"""Flower's FedAvg on the heart-disease hospitals, for ``fedmq bench straggler``: a server and four clients as
separate processes talking gRPC over loopback.

Run by the benchmark with the Python that has ``flwr`` (an optional benchmark dependency: ``pip install
flwr``)::

    python -m benchmarks.flower_heart server --address 127.0.0.1:PORT --seed 0 --history rounds.jsonl
    python -m benchmarks.flower_heart client --address 127.0.0.1:PORT --site cleveland --seed 0 --slowdown 10

It uses Flower's classic server/client entry points (``flwr.server.start_server`` and
``flwr.client.start_client``, deprecated in favour of SuperLink/SuperNode but still shipped): the lightest way
to run Flower's synchronous FedAvg as real processes, so the comparison does not charge Flower for the extra
processes of its deployment runtime. Only public Flower API is used. Everything Flower would compute itself is
kept identical to fedmq: the initial model (seeded as the coordinator seeds it), each client's local training
(``train_like_a_site_agent``: same loop, steps, learning rate, batch size, seeding and slowdown), FedAvg
weighted by training examples, and the referee that scores every round's global model (``HeartReferee``),
appended with a timestamp to ``--history``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.heart import HeartReferee, initial_heart_model, train_like_a_site_agent, warm_up
from schemas import TrainingConfig
from tasks.heart_disease import HeartDiseaseTask, load_site

PARAMETER_NAMES = ("linear.weight", "linear.bias")
READY_MARKER = "fedmq-bench: client ready"  # printed once warmed up, right before connecting


def _to_arrays(tensors: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return [tensors[name].numpy().copy() for name in PARAMETER_NAMES]


def _to_tensors(arrays: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
    return {
        name: torch.from_numpy(np.array(array, dtype=np.float32))
        for name, array in zip(PARAMETER_NAMES, arrays, strict=True)
    }


def run_server(args: argparse.Namespace) -> int:
    import flwr

    referee = HeartReferee()
    history = Path(args.history)

    def evaluate(server_round: int, arrays: list[np.ndarray], config: dict[str, Any]) -> tuple[float, dict[str, Any]]:
        scores = referee.score(_to_tensors(arrays))
        with history.open("a") as handle:
            row = {
                "time": time.time(),
                "round": server_round,
                "pooled": scores.pooled,
                "mean": scores.mean,
                "per_site": scores.per_site,
                "site_weighted": scores.site_weighted,
            }
            handle.write(json.dumps(row) + "\n")
        return 0.0, {"accuracy": scores.pooled}

    strategy = flwr.server.strategy.FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.clients,
        min_available_clients=args.clients,
        evaluate_fn=evaluate,
        on_fit_config_fn=lambda server_round: {"round": server_round},
        initial_parameters=flwr.common.ndarrays_to_parameters(_to_arrays(initial_heart_model(args.seed))),
    )
    flwr.server.start_server(
        server_address=args.address,
        config=flwr.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
    )
    return 0


def run_client(args: argparse.Namespace) -> int:
    import flwr

    torch.set_num_threads(1)  # as the site agent does ([agent] threads = 1)
    data = load_site(args.site)
    warm_up(HeartDiseaseTask(), data)  # as the fedmq sites of the benchmark do (WarmedHeartDiseaseTask)
    training = TrainingConfig(local_steps=args.local_steps, learning_rate=args.learning_rate, batch_size=4)

    class HeartClient(flwr.client.NumPyClient):
        """Train on this hospital's split the way a fedmq site agent does."""

        def get_parameters(self, config: dict[str, Any]) -> list[np.ndarray]:
            return _to_arrays(initial_heart_model(args.seed))

        def fit(
            self, parameters: list[np.ndarray], config: dict[str, Any]
        ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
            tensors, num_examples = train_like_a_site_agent(
                args.site,
                _to_tensors(parameters),
                seed=args.seed,
                seq=int(config.get("round", 0)),
                training=training,
                slowdown=args.slowdown,
                data=data,
            )
            return _to_arrays(tensors), num_examples, {}

    print(READY_MARKER, flush=True)
    flwr.client.start_client(server_address=args.address, client=HeartClient().to_client(), insecure=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.flower_heart", description=__doc__)
    roles = parser.add_subparsers(dest="role", required=True)
    server = roles.add_parser("server", help="FedAvg server scoring every round's model")
    server.add_argument("--address", required=True)
    server.add_argument("--seed", type=int, default=0)
    server.add_argument("--rounds", type=int, default=100_000)
    server.add_argument("--clients", type=int, default=4)
    server.add_argument("--history", required=True, help="JSONL file: one scored row per round")
    server.set_defaults(handler=run_server)
    client = roles.add_parser("client", help="one hospital")
    client.add_argument("--address", required=True)
    client.add_argument("--site", required=True)
    client.add_argument("--seed", type=int, default=0)
    client.add_argument("--slowdown", type=float, default=1.0)
    client.add_argument("--local-steps", type=int, default=100)
    client.add_argument("--learning-rate", type=float, default=0.01)
    client.set_defaults(handler=run_client)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())

"""ServerApp: FedAvg over synthetic float32 arrays, timing each round.

A round is timed from the start of ``configure_train`` (before the global
arrays are sent) to the end of ``aggregate_train`` (after FedAvg has averaged
the replies), with ``time.perf_counter`` in the ServerApp process. Evaluation
is switched off (``fraction_evaluate=0``) so a round is one train exchange.
Results go to the JSON file named by the ``out-path`` run-config value.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that records when each round starts and finishes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.started: dict[int, float] = {}
        self.finished: dict[int, float] = {}
        self.replies: dict[int, int] = {}
        self.client_codec_s: dict[int, list[float]] = {}
        self.errors: list[str] = []

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.started[server_round] = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        self.replies[server_round] = len(ok)
        self.errors += [f"round {server_round}: node {r.metadata.src_node_id}: {r.error.reason}" for r in replies if r.has_error()]
        self.client_codec_s[server_round] = [float(r.content["metrics"]["client-codec-s"]) for r in ok]
        result = super().aggregate_train(server_round, replies)
        self.finished[server_round] = time.perf_counter()
        return result


def _initial_arrays(layout_path: str) -> tuple[ArrayRecord, int]:
    layout = json.loads(Path(layout_path).read_text())
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(int(np.prod(shape)), dtype=np.float32).reshape(shape) for shape in layout["shapes"]]
    return ArrayRecord(arrays, keep_input=False), sum(int(np.prod(s)) for s in layout["shapes"])


def _wait_for_nodes(grid: Grid, count: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        connected = len(list(grid.get_node_ids()))
        if connected >= count or time.monotonic() > deadline:
            return connected
        time.sleep(0.2)


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    out_path = Path(str(cfg["out-path"]))
    nodes = int(cfg["num-nodes"])
    record: dict = {"errors": []}
    strategy = None
    try:
        arrays, n_params = _initial_arrays(str(cfg["layout-path"]))
        record.update(params=n_params, n_arrays=len(arrays), payload_bytes=int(arrays.count_bytes()))
        record["nodes_connected"] = _wait_for_nodes(grid, nodes, 120.0)
        if record["nodes_connected"] < nodes:
            raise RuntimeError(f"only {record['nodes_connected']} of {nodes} SuperNodes connected")
        strategy = TimedFedAvg(
            fraction_train=1.0, fraction_evaluate=0.0,
            min_train_nodes=nodes, min_available_nodes=nodes,
        )
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=int(cfg["num-rounds"]), timeout=float(cfg["round-timeout-s"]))
    except Exception as exc:  # noqa: BLE001 -- recorded in the JSON, the driver reports it
        record["errors"].append(f"{type(exc).__name__}: {exc}")
        record["traceback"] = traceback.format_exc()
    finally:
        if strategy is not None:
            rounds = sorted(strategy.finished)
            record["per_round_s"] = [strategy.finished[r] - strategy.started[r] for r in rounds]
            # end-of-round to end-of-round, as fedseg's benchmarks/round_overhead.py times rounds (from round 1 on)
            record["round_interval_s"] = [strategy.finished[b] - strategy.finished[a] for a, b in pairwise(rounds)]
            record["replies_per_round"] = [strategy.replies.get(r, 0) for r in rounds]
            record["client_codec_s"] = [strategy.client_codec_s.get(r, []) for r in rounds]
            record["errors"] += strategy.errors
            record["errors"] += [f"round {r}: {strategy.replies[r]} of {nodes} replies" for r in rounds if strategy.replies[r] < nodes]
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(out_path)

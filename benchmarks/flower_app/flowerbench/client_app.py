"""ClientApp that "trains" by sleeping, then returns the received arrays.

``reply = "perturb"`` (default) nudges one float every 1 MiB of each array so
that every 5 MiB transfer chunk differs from what the SuperLink already holds:
Flower's object store is content-addressed and skips uploading chunks it has
seen, so echoing the arrays unchanged (``reply = "echo"``) would make the
upload nearly free and understate the cost of returning a trained model.
"""

from __future__ import annotations

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# One changed float32 every 1 MiB: below Flower's 5 MiB chunk size, so every chunk changes.
PERTURB_STRIDE = 262_144

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    sleep_s = float(context.run_config["sleep-s"])
    reply = str(context.run_config["reply"])
    arrays: ArrayRecord = msg.content["arrays"]
    start = time.perf_counter()
    time.sleep(sleep_s)
    slept = time.perf_counter()
    if reply == "perturb":
        rng = np.random.default_rng()
        out = ArrayRecord()
        for key in list(arrays.keys()):
            array = arrays[key]
            del arrays[key]  # drop each received array once copied: peak memory ~2x the model, not 3x
            values = array.numpy()
            if not values.flags.writeable:
                values = values.copy()
            flat = values.reshape(-1)
            flat[::PERTURB_STRIDE] += np.asarray(1e-3 * (1.0 + rng.random()), dtype=values.dtype)
            out[key] = Array(values)
        arrays = out
    done = time.perf_counter()
    metrics = MetricRecord({"num-examples": 1, "client-sleep-s": slept - start, "client-codec-s": done - slept})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

"""P14: bytes the reducer reads from storage per run and cell, against a real S3 API.

A moto S3 server on 127.0.0.1 holds one checkpoint folder per target run of the reducer tests'
tiny sweep (tests/reduce_sweep.py: 13 runs over four arms): its weights file
(``model.safetensors``, as a trial's closing checkpoint) and a train state four times its
size (what a snapshot adds beside it), which the reducer must never read. The runs' loaders
are ``orchestration.search.read_weights`` on Tune checkpoints whose filesystem is the S3 one
wrapped to count every byte it serves. One cell is reduced in full (every strategy, the
ablations and the curves, which rebuild soups from the runs many times) inside
``local_weights()``, as a reducer task runs. P14 = bytes served / (runs x one weights file).
Goal <= 1.1: each run's weights file read once, nothing else.

    python benchmarks/bench_reducer_io.py
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from loopback_s3 import AWS_PROFILE_VARIABLES, free_port, loopback_filesystem, start_moto

FIGURES = {"P14": "cpu"}
GOAL = 1.1
BUCKET = "ratatouille-bench"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _counting_fs(inner):
    """``inner`` behind a pyarrow PyFileSystem that counts the bytes it serves, per path."""
    import pyarrow as pa
    import pyarrow.fs as pafs

    class Counting(pafs.FileSystemHandler):
        def __init__(self) -> None:
            self.served: dict[str, int] = {}

        def _count(self, path: str, data: bytes) -> pa.BufferReader:
            self.served[path] = self.served.get(path, 0) + len(data)
            return pa.BufferReader(data)

        def open_input_stream(self, path):
            with inner.open_input_stream(path) as stream:
                return self._count(path, stream.read())

        def open_input_file(self, path):
            with inner.open_input_file(path) as handle:
                return self._count(path, handle.read())

        def get_type_name(self):
            return "counting"

        def equals(self, other):
            return self is other

        def normalize_path(self, path):
            return inner.normalize_path(path)

        def get_file_info(self, paths):
            return inner.get_file_info(paths)

        def get_file_info_selector(self, selector):
            return inner.get_file_info(selector)

        def create_dir(self, path, recursive):
            inner.create_dir(path, recursive=recursive)

        def delete_dir(self, path):
            inner.delete_dir(path)

        def delete_dir_contents(self, path, missing_dir_ok=False):
            inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

        def delete_root_dir_contents(self):
            raise NotImplementedError

        def delete_file(self, path):
            inner.delete_file(path)

        def move(self, src, dest):
            inner.move(src, dest)

        def copy_file(self, src, dest):
            inner.copy_file(src, dest)

        def open_output_stream(self, path, metadata):
            return inner.open_output_stream(path, metadata=metadata)

        def open_append_stream(self, path, metadata):
            raise NotImplementedError

    handler = Counting()
    return pafs.PyFileSystem(handler), handler


def p14(port: int) -> str:
    import torch
    from ray import tune
    from safetensors.torch import save

    from ratatouille.core.names import WeightsFile
    from ratatouille.orchestration.search import local_weights, read_weights
    from ratatouille.reducer.reduce import TargetRun, reduce_cell
    from reduce_sweep import build_sweep, hand_acc, make_inputs

    torch.set_num_threads(1)
    s3 = loopback_filesystem(port)
    s3.create_dir(BUCKET)
    counted, handler = _counting_fs(s3)
    sweep = build_sweep()
    file_bytes = {}
    runs = []
    for run_id, arm, source in sweep["meta"]:
        folder = f"{BUCKET}/sweep/{run_id}/checkpoint_000001"
        weights = save({k: v.contiguous() for k, v in sweep["states"][run_id].items()})
        with s3.open_output_stream(f"{folder}/{WeightsFile.MODEL.filename}") as out:
            out.write(weights)
        with s3.open_output_stream(f"{folder}/train_state.safetensors") as out:
            out.write(os.urandom(4 * len(weights)))
        file_bytes[run_id] = len(weights)
        checkpoint = tune.Checkpoint(folder, filesystem=counted)
        load = functools.partial(read_weights, checkpoint, WeightsFile.MODEL)
        accuracy = hand_acc(sweep["states"][run_id], sweep["val"])
        runs.append(TargetRun(run_id, arm, source, accuracy, load, {}))
    inputs = make_inputs(sweep)
    inputs.runs = runs
    with local_weights():
        result = reduce_cell(inputs)
    served = sum(handler.served.values())
    floor = sum(file_bytes.values())
    states = sum("train_state" in path for path in handler.served)
    ratio = served / floor
    verdict = "meets" if ratio <= GOAL else "MISSES"
    return (
        f"P14 reducer bytes read from S3 per run and cell / one weights file: {ratio:.3f} "
        f"({served} bytes served for {len(runs)} runs whose weights files hold {floor}; "
        f"{len(handler.served)} objects read, {states} train states; one cell reduced in full: "
        f"{len(result.table)} strategies, ablations and curves; moto S3 on 127.0.0.1; "
        f"goal <= {GOAL}: {verdict})"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="(one size: already quick)")
    parser.parse_args(argv)
    for name in AWS_PROFILE_VARIABLES:
        os.environ.pop(name, None)
    port = free_port()
    server = start_moto(port)
    try:
        print(p14(port), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()

"""The reducer reads each run's weights file from storage once per cell, and nothing else of its
checkpoint (issue 19.2); its memory does not hold the runs' logits (checked by chunking)."""

from __future__ import annotations

import functools
from collections import Counter

import fsspec
import numpy as np
import pandas
import pytest
import torch
from pyarrow.fs import FSSpecHandler, PyFileSystem
from ray import tune
from safetensors.torch import save_file

from ratatouille.core.names import TRAIN_STATE_FILE, WeightsFile
from ratatouille.orchestration.search import local_weights, read_weights
from ratatouille.reducer import evaluate
from ratatouille.reducer.reduce import reduce_cell
from reduce_sweep import build_sweep, make_inputs

torch.set_num_threads(1)


class CountingHandler(FSSpecHandler):
    """A local filesystem that counts every file opened for reading, by path."""

    def __init__(self, opened: Counter) -> None:
        super().__init__(fsspec.filesystem("file"))
        self.opened = opened

    def open_input_stream(self, path):
        self.opened[path] += 1
        return super().open_input_stream(path)

    def open_input_file(self, path):
        self.opened[path] += 1
        return super().open_input_file(path)


@pytest.fixture(scope="module")
def sweep():
    return build_sweep()


def _table(result) -> pandas.DataFrame:
    return result.table[["strategy", "ood_acc", "id_val_acc"]].reset_index(drop=True)


def test_each_runs_weights_file_is_read_once_per_cell_and_its_train_state_never(sweep, tmp_path):
    opened: Counter = Counter()
    fs = PyFileSystem(CountingHandler(opened))
    inputs = make_inputs(sweep)
    for run in inputs.runs:
        folder = tmp_path / run.run_id
        folder.mkdir()
        save_file(sweep["states"][run.run_id], folder / WeightsFile.MODEL.filename)
        (folder / TRAIN_STATE_FILE).write_bytes(b"optimizer moments" * 1000)
        checkpoint = tune.Checkpoint(str(folder), filesystem=fs)
        run.load_state = functools.partial(read_weights, checkpoint, WeightsFile.MODEL)
    with local_weights() as cache:
        from_storage = reduce_cell(inputs)
    models = {str(tmp_path / r.run_id / WeightsFile.MODEL.filename) for r in inputs.runs}
    assert dict(opened) == {path: 1 for path in models}  # the train states were never opened
    assert cache.fetched == Counter({path: 1 for path in models})
    file_bytes = sum((tmp_path / r.run_id / WeightsFile.MODEL.filename).stat().st_size
                     for r in inputs.runs)  # fmt: skip
    assert cache.bytes_fetched == file_bytes
    in_memory = reduce_cell(make_inputs(sweep))
    pandas.testing.assert_frame_equal(_table(from_storage), _table(in_memory))


def test_read_weights_outside_a_reducer_task_fetches_only_the_weights_file(sweep, tmp_path):
    opened: Counter = Counter()
    run_id = sweep["meta"][0][0]
    save_file(sweep["states"][run_id], tmp_path / WeightsFile.MODEL.filename)
    (tmp_path / TRAIN_STATE_FILE).write_bytes(b"x" * 100)
    checkpoint = tune.Checkpoint(str(tmp_path), filesystem=PyFileSystem(CountingHandler(opened)))
    state = read_weights(checkpoint, WeightsFile.MODEL)
    assert all(torch.equal(state[k], v) for k, v in sweep["states"][run_id].items())
    assert dict(opened) == {str(tmp_path / WeightsFile.MODEL.filename): 1}


def test_chunked_forward_passes_and_ensembles_give_the_unchunked_numbers(sweep, monkeypatch):
    settings = make_inputs(sweep).settings
    settings.batch_size = 16
    whole = reduce_cell(make_inputs(sweep, settings=settings))
    calls: list[int] = []

    def counting_predict(model, dataset, **kwargs):
        calls.append(len(dataset))
        return evaluate._default_predict()(model, dataset, **kwargs)

    # 240 OOD and 70 ID-val images per domain, batches of 16: chunks of 32 images
    monkeypatch.setattr(evaluate, "CHUNK_IMAGES", 40)
    chunked = reduce_cell(make_inputs(sweep, settings=settings, predict=counting_predict))
    assert max(calls) == 32 and 240 % 32 == 16  # the last OOD chunk is a partial one
    pandas.testing.assert_frame_equal(_table(chunked), _table(whole))
    np.testing.assert_allclose(chunked.diversity.q_diversity, whole.diversity.q_diversity)

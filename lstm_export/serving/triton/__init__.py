"""Serve an export with Triton Inference Server: a model repository for the onnxruntime backend.

Triton batches along the first dimension of every tensor, so Triton gets the batch-first
variant of the export's `model.onnx` (`lstm_export.exporters.batch_first`): x, y and the
states batch-major. A batch_first model's `model.onnx` takes batch-first x already, so only
its states gain a Transpose.

`config.pbtxt` puts the model under the sequence batcher with implicit state: Triton
keeps each stream's (h, c) between its requests, feeding request i's `hn`/`cn` back as
request i+1's `h0`/`c0`, and zeros (`initial_state { zero_data: true }`) to a stream's
first request. One request is one chunk of one stream, x [1, chunk, input_size] (the
sequence batcher takes batch size 1 per request); Triton stacks up to `max_batch_size`
streams along dim 0, and rows of the LSTM never mix, so whatever fills a slot that has
no request (Triton's null request) does not touch the other streams. No START/READY
control inputs are needed: the zero initial state is the start.

A graph's optional `lengths` input is not listed: Triton's onnxruntime backend refuses an
optional input on a model that batches ("optional input ... is not supported for models that
support batching"), and a required one would make every client send it; the graph's default
(every sequence full) runs each chunk whole. A bidirectional model is refused
(`check_streamable`): a stream cannot run backwards from an end it has not seen.

- `model_config`: the config.pbtxt text, and reading it with tritonclient's `ModelConfig`;
- `validate`: `validate_triton_repo`, the checks the onnxruntime backend makes on loading
  (we cannot run a Triton server here; the tests simulate the sequence batcher's state);
- `repository`: `write_triton_repo`, which first holds the batch-first graph to the parity
  rule against the export's eager model in float64 (`check_batch_first`).
"""

from __future__ import annotations

from lstm_export.serving.triton.repository import write_triton_repo
from lstm_export.serving.triton.validate import validate_triton_repo

__all__ = ["validate_triton_repo", "write_triton_repo"]

"""Stream one sequence through the LSTM that Triton serves from the repository
`lstm-export triton` wrote, chunk by chunk; the same script runs against `lstm-export serve`.

    python examples/triton_client.py x.npy y.npy --url localhost:8000 --model default
"""

import argparse

import numpy as np
import tritonclient.http as httpclient

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("x", help="a .npy file: one sequence, [seq, input_size]")
parser.add_argument("y", help="where to save its y, [seq, hidden_size], as .npy")
parser.add_argument("--url", default="localhost:8000", help="host:port, no scheme")
parser.add_argument("--model", default="default", help="the model's name")
parser.add_argument("--chunk", type=int, default=10, help="steps per request")
parser.add_argument("--sequence-id", type=int, default=1, help="any id not in use")
args = parser.parse_args()

client = httpclient.InferenceServerClient(args.url)
if not client.is_model_ready(args.model):
    raise SystemExit(f"model {args.model!r} is not ready at {args.url}")
(x_spec,) = client.get_model_metadata(args.model)["inputs"]  # x: [-1, -1, input_size]
x = np.load(args.x).astype(np.float32)[None]  # [1, seq, input_size]: one sequence a request
if x.shape[2] != x_spec["shape"][2]:
    raise SystemExit(f"the model takes {x_spec['shape'][2]} features, {args.x} has {x.shape[2]}")

starts = range(0, x.shape[1], args.chunk)
ys = []
for i, start in enumerate(starts):
    chunk = x[:, start : start + args.chunk]
    tensor = httpclient.InferInput("x", list(chunk.shape), "FP32")
    tensor.set_data_from_numpy(chunk)  # raw float32 bytes: Triton's binary tensor extension
    result = client.infer(
        args.model,
        [tensor],
        outputs=[httpclient.InferRequestedOutput("y")],
        sequence_id=args.sequence_id,  # the server keeps (h, c) per sequence between requests
        sequence_start=i == 0,  # zeros
        sequence_end=i == len(starts) - 1,  # then the server forgets it
    )
    ys.append(result.as_numpy("y")[0])
np.save(args.y, np.concatenate(ys))
print(f"{x.shape[1]} steps in {len(starts)} requests -> {args.y}")

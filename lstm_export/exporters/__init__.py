"""The export steps, each a function: the model -> TorchScript routes, ONNX graph, fused kernel.

Below verification: nothing here proves anything; `lstm_export.pipeline` runs these steps,
then `lstm_export.verification`, then moves the folder into place.
"""

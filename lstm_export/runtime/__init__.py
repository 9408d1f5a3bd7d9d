"""Running the artifacts as users do: onnxruntime (`OnnxLSTM`), model.pt2 (`Pt2LSTM`) and the
libtorch C++ program.

Depends only on the core modules, so verification, serving and bench can all run artifacts
through the very code users run.
"""

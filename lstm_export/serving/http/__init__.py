"""`lstm-export serve`: the HTTP server over `OnnxLSTM` (starlette, uvicorn, orjson)."""

"""`python -m fer_jax.serve`: the recogniser as an HTTP API and a web page (docs/serve.md).

- `uploads`: an uploaded image from the request body (raw or multipart, parsed in memory) to
  gray pixels, within byte and pixel limits; each bad input is an `UploadError` with its HTTP
  status and one message.
- `service`: decoding and face detection on a thread pool, then one batching worker that runs
  the model on the faces of every request waiting for it as one batch.
- `app`: the FastAPI application: `POST /v1/predict`, `GET /healthz`, the page at `/`.
- `__main__`: the command line: load the model, compile and warm it, then listen.

FastAPI, uvicorn and python-multipart come with the `serve` extra (`pip install -e ".[serve]"`);
nothing here imports TensorFlow.
"""

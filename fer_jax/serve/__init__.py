"""`python -m fer_jax.serve`: the recogniser as an HTTP API and a web page (docs/serve.md).

`uploads`: a request body to gray pixels, within limits; `service`: decoding, detection and a
batching model worker; `app`: the FastAPI application; `__main__`: the command line. Needs the
`serve` extra (FastAPI, uvicorn, python-multipart); nothing here imports TensorFlow.
"""

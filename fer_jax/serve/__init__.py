"""`python -m fer_jax.serve`: the recogniser as an HTTP API and a web page (docs/serve.md).

`service`: admission, decoding within limits, detection and a batching model worker; `app`: the
FastAPI application, a request's body to the image's bytes; `__main__`: the command line. Needs
the `serve` extra (FastAPI, uvicorn, python-multipart); nothing here imports TensorFlow.
"""

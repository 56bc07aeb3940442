"""`lorakit serve`: an OpenAI-compatible server (app: HTTP, protocol: request/response JSON) over a continuous-batching
engine (engine) that decodes every adapter's requests in one batch. Import ``lorakit.serve.app`` only with the
``lorakit[serve]`` extra installed (FastAPI, uvicorn); the engine needs neither."""

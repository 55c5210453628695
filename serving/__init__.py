"""`serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model, batching concurrent requests,
with a chat page at `/`. app.py: the routes and their errors; scheduler.py: the server's side of the model
process; worker.py: the model process and its batch; protocol.py: requests checked and responses shaped as
OpenAI's; server.py: start-up and draining."""

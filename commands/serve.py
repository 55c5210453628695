"""`serve`: the model behind an OpenAI-compatible HTTP API and a chat page (serving/), until Ctrl-C or SIGTERM."""
import os
import sys

from commands.options import ServeFlags
from config import resolve_path
from inference.decoding import check_supported, decoding_settings, ignored_settings
from inference.saved_model import model_dir_problem
from utils.errors import UserError


def model_id(model_dir: str) -> str:
    """The name clients send as `model`: the model's directory and its parent (`demo/final`), which says which
    run's model it is."""
    path = os.path.abspath(resolve_path(model_dir)).rstrip(os.sep)
    return "/".join(path.split(os.sep)[-2:])


def serve_command(flags: ServeFlags) -> None:
    settings = decoding_settings(flags)
    check_supported(settings, "transformers", streaming=True)
    problem = model_dir_problem(flags.model_dir)
    if problem:
        raise UserError(problem.replace("generate reads it with --engine=ctranslate2",
                                        "serve answers with a saved model; give the one it was exported from"))
    if flags.host not in ("127.0.0.1", "localhost", "::1") and not flags.api_key:
        print(f"warning: --host={flags.host} accepts connections from other machines and --api_key is not set: "
              "anyone who can reach the port can use the model", file=sys.stderr)
    for warning in ignored_settings(settings):
        print(f"warning: {warning}", file=sys.stderr)

    from model.tokenizer import load_tokenizer
    from serving.app import ServerSettings
    from serving.scheduler import Scheduler
    from serving.server import serve

    # The model loads in its own process (serving/worker.py); this one needs the tokenizer, for the prompts.
    scheduler = Scheduler(flags.model_dir, load_tokenizer(resolve_path(flags.model_dir)), flags.max_batch,
                          flags.queue_size)
    server_settings = ServerSettings(model_id=model_id(flags.model_dir), defaults=settings,
                                     max_seq_len=flags.max_seq_len, api_key=flags.api_key,
                                     max_body_bytes=flags.max_body_kb * 1024)
    serve(scheduler, server_settings, flags.host, flags.port, flags.drain_seconds)

"""`chat`: a conversation with a saved model in the terminal, each answer printed token by token as it is
generated (generate runs in a thread of its own and hands each token to a streamer; the terminal stays
responsive). Earlier turns go into the prompt by the chat template (inference/template.py), the oldest left out to
fit --max_seq_len. /reset forgets the conversation, /exit or Ctrl-D leaves, Ctrl-C stops the answer being
written (the conversation goes on; what was written of it stays in the conversation)."""
import queue
import sys
import threading

from commands.options import ChatFlags
from inference.decoding import check_supported, decoding_settings, ignored_settings, resolved_seed, transformers_kwargs
from inference.template import Message, PromptTooLong, fit_prompt
from serving.worker import held_back

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"
USER_PROMPT, MODEL_PROMPT = "you> ", "model> "


class TokenStreamer:
    """generate's streamer (the BaseStreamer protocol: put, end) that hands over the text of each new token at
    once. transformers' TextIteratorStreamer waits for a space or a CJK ideograph before it passes text on, so an
    answer of other characters (punctuation, digits, kana) would appear only at its end; this one holds back only
    a character whose bytes are not all generated yet."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.sent, self.prompt_seen = tokenizer, [], 0, False
        self.pieces = queue.Queue()

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate's first call passes the decoder's start token
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        text = text[:len(text) - held_back(text)]
        if len(text) > self.sent:
            self.pieces.put(text[self.sent:])
            self.sent = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if len(text) > self.sent:
            self.pieces.put(text[self.sent:])
        self.pieces.put(None)

    def __iter__(self):
        while (piece := self.pieces.get()) is not None:
            yield piece


class Stopper:
    """A StoppingCriteria that ends generate at its next step once `stop` is set (Ctrl-C)."""

    def __init__(self):
        self.event = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Conversation:
    def __init__(self, flags: ChatFlags):
        from inference.saved_model import load_for_answers

        self.settings = decoding_settings(flags)
        self.max_seq_len = flags.max_seq_len
        self.model, self.tokenizer, self.placement = load_for_answers(flags.model_dir)
        self.messages: list[Message] = []

    def answer(self, text: str) -> None:
        """Print the answer to `text` as it is generated, and keep both in the conversation."""
        import torch

        try:
            prompt = fit_prompt(self.messages + [Message("user", text)], self.tokenizer, self.max_seq_len)
        except PromptTooLong as error:
            print(f"(not sent: {error} (--max_seq_len); write a shorter message)", file=sys.stderr, flush=True)
            return
        if prompt.dropped_messages:
            print(f"(the {prompt.dropped_messages} oldest messages are left out to fit --max_seq_len="
                  f"{self.max_seq_len})", file=sys.stderr, flush=True)
        streamer = TokenStreamer(self.tokenizer)
        stopper = Stopper()
        inputs = torch.tensor([prompt.ids], device=self.placement.device)
        if self.settings.do_sample:
            torch.manual_seed(resolved_seed(self.settings))

        def generate():
            with torch.no_grad(), self.placement.autocast():
                self.model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), streamer=streamer,
                                    stopping_criteria=[stopper], **transformers_kwargs(self.settings))
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        pieces = []
        print(MODEL_PROMPT, end="", flush=True)
        try:
            for piece in streamer:
                pieces.append(piece)
                print(piece, end="", flush=True)
            ended = "\n"
        except KeyboardInterrupt:
            stopper.event.set()
            ended = " (stopped)\n"
        worker.join()
        print(ended, end="", flush=True)
        self.messages += [Message("user", text), Message("assistant", "".join(pieces))]


def chat_command(flags: ChatFlags) -> None:
    settings = decoding_settings(flags)
    check_supported(settings, "transformers", streaming=True)
    for warning in ignored_settings(settings):
        print(f"warning: {warning}", file=sys.stderr)
    conversation = Conversation(flags)
    print(f"chat with {flags.model_dir} on {conversation.placement.describe()}: {HELP}", flush=True)
    while True:
        try:
            text = input(USER_PROMPT).strip()
        except EOFError:
            print()
            break
        except KeyboardInterrupt:  # at the prompt: no answer to stop; say how to leave
            print(f"\n({HELP})", flush=True)
            continue
        if text == "/exit":
            break
        if text == "/reset":
            conversation.messages = []
            print("(conversation forgotten)", flush=True)
        elif text.startswith("/"):
            print(f"(unknown command {text.split()[0]}: {HELP})", flush=True)
        elif text:
            conversation.answer(text)

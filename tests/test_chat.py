"""`chat` in a terminal, driven through its stdin like a person typing: answers as `generate` gives them, earlier
turns in the prompt by the chat template (trimmed from the oldest), /reset, /exit, Ctrl-D, and Ctrl-C that stops an
answer but not the program. The template itself: its format, its trimming, and the SFT rows it gives."""
import signal
import subprocess
import sys
import time

import pytest

from inference.template import Message, PromptTooLong, fit_prompt, render, sft_rows
from tests.cli_helpers import ENTRY, REPO, child_env, run_cli


def chat(model_dir: str, lines: list[str], **flags) -> subprocess.CompletedProcess:
    argv = [sys.executable, ENTRY, "chat", f"--model_dir={model_dir}", *(f"--{k}={v}" for k, v in flags.items())]
    return subprocess.run(argv, input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                          cwd=REPO, env=child_env(), timeout=120)


def answers_of(stdout: str) -> list[str]:
    return [line.split("model> ", 1)[1] for line in stdout.splitlines() if "model> " in line]


def generated(model_dir: str, prompt: str) -> str:
    return run_cli("generate", dict(model_dir=model_dir, prompt=prompt, max_new_tokens=24)).stdout.rstrip("\n")


class CharTokenizer:
    """One token per character plus [EOS], like ours on Chinese text: lengths that are easy to count here."""

    def __call__(self, text):
        return {"input_ids": list(range(len(text) + 1))}


def test_a_first_message_is_the_bare_prompt_and_earlier_turns_come_before_it():
    assert render([Message("user", "倒序：山水")]) == "倒序：山水"
    conversation = [Message("system", "你是助手"), Message("user", "你好"), Message("assistant", "你好！"),
                    Message("user", "倒序：山水")]
    assert render(conversation) == "你是助手\n用户：你好\n助手：你好！\n倒序：山水"


def test_the_oldest_turns_are_left_out_to_fit_and_the_last_message_and_system_stay():
    conversation = [Message("system", "系统"), Message("user", "一一一"), Message("assistant", "二二二"),
                    Message("user", "三三三"), Message("assistant", "四四四"), Message("user", "五五")]
    whole = fit_prompt(conversation, CharTokenizer(), 100)
    assert whole.dropped_messages == 0 and whole.text == render(conversation)
    # The system line (3) + 4 earlier messages (7 each) + the last (2) + [EOS]: 34; 33 drops the oldest turn whole.
    assert len(whole.ids) == 34
    trimmed = fit_prompt(conversation, CharTokenizer(), 33)
    assert trimmed.dropped_messages == 2 and trimmed.text == "系统\n用户：三三三\n助手：四四四\n五五"
    last_only = fit_prompt(conversation, CharTokenizer(), 10)
    assert last_only.dropped_messages == 4 and last_only.text == "系统\n五五"
    with pytest.raises(PromptTooLong, match="is 6 tokens; the model reads at most 5"):
        fit_prompt(conversation, CharTokenizer(), 5)


def test_a_multi_turn_conversation_gives_one_sft_row_per_answer_with_the_chat_prompt():
    conversation = [Message("user", "你好"), Message("assistant", "你好！"), Message("user", "倒序：山水"),
                    Message("assistant", "水山")]
    assert sft_rows(conversation) == [("你好", "你好！"), ("用户：你好\n助手：你好！\n倒序：山水", "水山")]


@pytest.mark.slow
def test_chat_answers_as_generate_does_with_earlier_turns_in_the_prompt(demo_model):
    model_dir, (first, second) = demo_model["model_dir"], demo_model["prompts"][:2]
    result = chat(model_dir, [first, second, "/exit"], max_new_tokens=24)
    assert result.returncode == 0, result.stderr
    answers = answers_of(result.stdout)
    assert len(answers) == 2 and answers[0] == generated(model_dir, first)
    history = render([Message("user", first), Message("assistant", answers[0]), Message("user", second)])
    assert answers[1] == generated(model_dir, history)


@pytest.mark.slow
def test_chat_leaves_out_the_oldest_turns_to_fit_and_reset_forgets_them(demo_model):
    model_dir, (first, second, third) = demo_model["model_dir"], demo_model["prompts"][:3]
    result = chat(model_dir, [first, second, "/reset", third], max_new_tokens=24, max_seq_len=16)  # then Ctrl-D
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("(the 2 oldest messages are left out to fit --max_seq_len=16)") == 1
    assert "(conversation forgotten)" in result.stdout
    assert answers_of(result.stdout) == [generated(model_dir, prompt) for prompt in (first, second, third)]


@pytest.mark.slow
def test_ctrl_c_stops_the_answer_and_the_conversation_goes_on(endless_model):
    process = subprocess.Popen([sys.executable, ENTRY, "chat", f"--model_dir={endless_model}", "--max_new_tokens=4096"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               env=child_env(), bufsize=0)
    try:
        process.stdin.write("你好\n".encode())
        seen, deadline = b"", time.time() + 60
        while b"model> " not in seen or len(seen.split(b"model> ", 1)[1]) < 20:
            assert time.time() < deadline, seen
            seen += process.stdout.read(1)
        process.send_signal(signal.SIGINT)  # what Ctrl-C sends to the terminal's foreground process
        process.stdin.write(b"/exit\n")
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    out, err = (seen + out).decode(), err.decode()
    assert process.returncode == 0, err
    answer = out.split("model> ", 1)[1]
    assert " (stopped)\n" in answer and len(answer.split(" (stopped)")[0]) < 4000
    assert answer.split(" (stopped)\n", 1)[1] == "you> "  # the next prompt, where /exit ended it
    assert "Traceback" not in err


@pytest.mark.slow
def test_a_message_too_long_for_max_seq_len_is_not_sent_and_chat_goes_on(demo_model):
    result = chat(demo_model["model_dir"], ["山" * 40, "/exit"], max_seq_len=8)
    assert result.returncode == 0
    assert "(not sent: the last message (with the system lines) is" in result.stderr
    assert "model> " not in result.stdout


def test_chat_refuses_beam_search_before_it_loads_a_model(tmp_path):
    result = chat(str(tmp_path), [], num_beams=2)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --num_beams=2: chat and serve stream one candidate")

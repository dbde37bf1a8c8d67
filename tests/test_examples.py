"""Every program in examples/ does what its docstring promises, run as `__main__` on tiny-random.

The examples call the public API (`mlx_qwen35.stream_generate`, `ChatSession`); the tests watch
those calls (a spy that forwards to the real function, a session subclass that scripts the
model's replies with a logits processor) and check what the program printed against what the
library produced: the media and flags reach the model, the streamed text is what is printed,
thinking is dimmed, tool calls run the local tools and a later round only prefills what is new.
"""

from __future__ import annotations

import io
import re
import runpy
import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from PIL import Image

import mlx_qwen35
import mlx_qwen35.engine.session as session_module
from mlx_qwen35.weights.tiny_random import CACHE_ENV, ensure_tiny_random

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
IM_END = "<|im_end|>"
DIM, RESET = "\033[2m", "\033[0m"


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache")
    ensure_tiny_random(root)
    return root


def run_example(monkeypatch, script: str, *args: str, stdin: str = "") -> None:
    monkeypatch.setattr(sys, "argv", [script, *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    runpy.run_path(str(EXAMPLES / script), run_name="__main__")


class StreamSpy:
    """Stands in for `mlx_qwen35.stream_generate`: records each call's arguments (and what
    `inspect` says about the media while the call runs), forwards to the real function and keeps
    the text it streamed."""

    def __init__(self, inspect=None, max_tokens: int | None = None):
        self.real = mlx_qwen35.stream_generate
        self.calls: list[dict] = []
        self.events: list[tuple[str, str]] = []
        self.inspect, self.max_tokens = inspect, max_tokens
        self.lock = threading.Lock()

    def __call__(self, model, processor, prompt, max_tokens=256, **kwargs):
        call = {"prompt": prompt, "max_tokens": max_tokens, **kwargs, "text": ""}
        with self.lock:
            self.calls.append(call)
            self.events.append(("start", prompt))
        if self.inspect is not None:
            call["seen"] = self.inspect(kwargs)
        if self.max_tokens is not None:  # keep the test cheap; the program's value is recorded
            max_tokens = min(max_tokens, self.max_tokens)
        for response in self.real(model, processor, prompt, max_tokens, **kwargs):
            call["text"] += response.text
            yield response
        with self.lock:
            self.events.append(("end", prompt))


@pytest.fixture
def spy(monkeypatch, tiny_cache):
    monkeypatch.setenv(CACHE_ENV, str(tiny_cache))

    def install(**kwargs) -> StreamSpy:
        s = StreamSpy(**kwargs)
        monkeypatch.setattr(mlx_qwen35, "stream_generate", s)
        return s

    return install


# ---------------------------------------------------------------------- images and videos


def write_png(path: Path, h: int, w: int) -> Path:
    Image.effect_noise((w, h), 60).convert("RGB").save(path)
    return path


def media_of(kind: str):
    """What a stream_generate call was given, looked at while it runs (demo files are
    temporary)."""

    def look(kwargs):
        (item,) = kwargs[kind]
        with Image.open(item) as image:
            return Path(item), image.size, getattr(image, "n_frames", 1)

    return look


def test_describe_image_streams_a_description_of_the_given_image(
    spy, monkeypatch, capsys, tmp_path
):
    s = spy(inspect=media_of("images"))
    image = write_png(tmp_path / "photo.png", 40, 56)
    args = ["--image", str(image), "--prompt", "What is it?", "--max-tokens", "5"]
    run_example(monkeypatch, "describe_image.py", "--model", "tiny-random", *args)
    (call,) = s.calls
    assert call["seen"] == (image, (56, 40), 1)
    assert (call["prompt"], call["max_tokens"]) == ("What is it?", 5)
    assert call["enable_thinking"] is False
    assert call["text"] and capsys.readouterr().out == call["text"] + "\n"


def test_describe_image_draws_a_demo_picture_without_one(spy, monkeypatch, capsys):
    s = spy(inspect=media_of("images"))
    run_example(monkeypatch, "describe_image.py", "--model", "tiny-random", "--max-tokens", "3")
    (call,) = s.calls
    path, size, _ = call["seen"]
    assert size == (320, 240) and not path.exists()  # drawn for the run, removed afterwards
    assert call["prompt"] == "Describe this image in two sentences."
    assert capsys.readouterr().out == call["text"] + "\n"


def test_ask_about_video_passes_its_sampling_flags(spy, monkeypatch, capsys, tmp_path):
    s = spy(inspect=media_of("videos"))
    clip = tmp_path / "clip.gif"
    frames = [Image.effect_noise((64, 48), 40 + 10 * i).convert("RGB") for i in range(6)]
    frames[0].save(clip, save_all=True, append_images=frames[1:], duration=250, loop=0)
    args = ["--video", str(clip), "--fps", "4", "--max-frames", "4", "--max-tokens", "4"]
    run_example(monkeypatch, "ask_about_video.py", "--model", "tiny-random", *args)
    (call,) = s.calls
    assert call["seen"] == (clip, (64, 48), 6)
    assert (call["fps"], call["max_frames"], call["max_tokens"]) == (4.0, 4, 4)
    assert call["enable_thinking"] is False
    assert call["text"] and capsys.readouterr().out == call["text"] + "\n"


def test_ask_about_video_draws_a_demo_clip_without_one(spy, monkeypatch, capsys):
    s = spy(inspect=media_of("videos"))
    run_example(monkeypatch, "ask_about_video.py", "--model", "tiny-random", "--max-tokens", "3")
    (call,) = s.calls
    path, size, frames = call["seen"]
    assert (size, frames) == ((160, 96), 12) and not path.exists()
    assert (call["fps"], call["max_frames"]) == (None, None)  # the checkpoint's own settings
    assert capsys.readouterr().out == call["text"] + "\n"


# ---------------------------------------------------------------------- sessions


class Script:
    """A logits processor that makes the model write `tokens` (then anything)."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.step = tokens, 0

    def __call__(self, history, logits):
        if self.step < len(self.tokens):
            hit = mx.arange(logits.shape[-1]) == self.tokens[self.step]
            logits = mx.where(hit, 0.0, -1e9) + mx.zeros_like(logits)
        self.step += 1
        return logits


@pytest.fixture
def scripted_sessions(monkeypatch, tiny_cache):
    """Replace the examples' ChatSession by one whose replies follow the given scripts, one per
    turn (each ends with <|im_end|>); returns the list the sessions made are appended to."""
    monkeypatch.setenv(CACHE_ENV, str(tiny_cache))
    made: list = []

    def install(replies: list[str]) -> list:
        pending = list(replies)

        class Scripted(session_module.ChatSession):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.replies: list = []
                made.append(self)

            def send(self, *args, **kwargs):
                text = pending.pop(0) + IM_END
                self.logits_processors = [Script(self.processor.encode(text))]
                reply = super().send(*args, **kwargs)
                self.replies.append(reply)
                return reply

        monkeypatch.setattr(session_module, "ChatSession", Scripted)
        return made

    return install


def test_chat_streams_each_reply_dims_thinking_and_reuses_the_cache(
    scripted_sessions, monkeypatch, capsys
):
    made = scripted_sessions(
        ["Hmm, greet.\n</think>\n\nHello!", "Fine.\n</think>\n\nWell, thanks."]
    )
    run_example(monkeypatch, "chat.py", "--model", "tiny-random", stdin="Hi\nHow are you?\n\n")
    (chat,) = made
    out = capsys.readouterr().out
    first, second = (r.result for r in chat.replies)
    assert [m["content"] for m in chat.history if m["role"] == "user"] == ["Hi", "How are you?"]
    assert (first.text, second.text) == ("Hello!", "Well, thanks.")
    # The reply text as it streamed, thinking dimmed and the answer plain.
    plain = out.replace(RESET + DIM, "").replace(DIM + RESET, "")  # one dim run per thinking
    assert f">> {DIM}Hmm, greet.\n{RESET}Hello!\n" in plain
    assert f"{DIM}Fine.\n{RESET}Well, thanks.\n" in plain
    stats = re.findall(r"\[(\d+) of (\d+) prompt tokens from the cache, [\d.]+ tokens/s\]", out)
    assert [tuple(map(int, s)) for s in stats] == [
        (first.reused_tokens, first.prompt_tokens),
        (second.reused_tokens, second.prompt_tokens),
    ]
    assert first.reused_tokens == 0 < second.reused_tokens  # the second turn reuses the cache
    assert out.count(">> ") == 3  # prompts until the empty line


AGENT_ROUNDS = [
    "Look up.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
    "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=calculate>\n"
    "<parameter=expression>\n21 - 7\n</parameter>\n</function>\n</tool_call>",
    "Done.\n</think>\n\nLisbon, by 14.",
]


def test_agent_runs_the_tools_and_prefills_only_what_is_new(scripted_sessions, monkeypatch, capsys):
    made = scripted_sessions(AGENT_ROUNDS)
    run_example(monkeypatch, "agent.py", "--model", "tiny-random", "--verbose")
    (chat,) = made
    out = capsys.readouterr().out
    assert "-> get_weather({'city': 'Oslo'}) = {'city': 'Oslo', 'temperature_c': 7, 'sky': " in out
    assert "-> calculate({'expression': '21 - 7'}) = {'expression': '21 - 7', 'result': 14}" in out
    assert out.rstrip().endswith("Answer: Lisbon, by 14.")
    tool_messages = [m for m in chat.history if m["role"] == "tool"]
    assert [m["name"] for m in tool_messages] == ["get_weather", "calculate"]
    assert '"temperature_c": 7' in tool_messages[0]["content"]
    counts = re.findall(
        r"\(prompt (\d+) tokens, (\d+) from the cache, (\d+) prefilled; (\d+) generated\)", out
    )
    (prompt, reused, prefilled, generated), (prompt2, reused2, prefilled2, _) = [
        tuple(map(int, c)) for c in counts
    ]
    assert reused == 0 and prefilled == prompt
    # The whole first round stays in the cache; only the tool results are prefilled.
    assert reused2 == prompt + generated
    assert prefilled2 == prompt2 - reused2 < prompt2 // 4


def test_agent_tools_on_their_own():
    agent = runpy.run_path(str(EXAMPLES / "agent.py"), run_name="agent")
    assert agent["calculate"]("(2 + 3) * 4 ** 2 % 7") == {
        "expression": "(2 + 3) * 4 ** 2 % 7",
        "result": (2 + 3) * 4**2 % 7,
    }
    # Parsed, never executed.
    assert "error" in agent["calculate"]("__import__('os').getcwd()")
    assert "error" in agent["calculate"]("1 / 0")
    assert agent["get_weather"](" paris ") == {
        "city": " paris ",
        "temperature_c": 15,
        "sky": "cloudy",
    }
    assert "known: lisbon, oslo, paris" in agent["get_weather"]("Rome")["error"]


# ---------------------------------------------------------------------- an app


def test_embed_in_app_answers_both_threads_one_after_another(spy, monkeypatch, capsys):
    s = spy(max_tokens=6)
    run_example(monkeypatch, "embed_in_app.py", "--model", "tiny-random")
    out = capsys.readouterr().out
    assert sorted(c["prompt"] for c in s.calls) == ["Hi!", "Name a colour."]
    for call in s.calls:
        assert call["max_tokens"] == 64 and call["enable_thinking"] is False
        assert (call["temp"], call["top_p"], call["top_k"]) == (0.7, 0.8, 20)
        assert f"Q: {call['prompt']}\nA: {call['text']}\n" in out
    # The lock serves one request at a time: each call ends before the next starts.
    kinds = [kind for kind, _ in s.events]
    assert kinds == ["start", "end", "start", "end"]
    assert s.events[0][1] == s.events[1][1] and s.events[2][1] == s.events[3][1]


def test_embed_in_app_reports_a_load_failure_in_one_line(monkeypatch, capsys, tmp_path):
    run_example(monkeypatch, "embed_in_app.py", "--model", str(tmp_path / "missing"))
    out = capsys.readouterr().out
    assert out.startswith("Could not start: ") and out.count("\n") == 1

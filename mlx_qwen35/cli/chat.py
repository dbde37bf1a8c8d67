"""`python -m mlx_qwen35.chat`: an interactive multi-turn chat in the terminal.

Each line you type is a message; the reply streams back, its thinking dimmed (or hidden with
--hide-thinking). The conversation's states are kept between turns (see engine/session.py), so a
turn only processes what is new. Commands:

    /image PATH   attach an image to your next message (repeatable)
    /video PATH   attach a video to your next message
    /reset        start over (the system prompt stays)
    /save FILE    save the conversation and its caches
    /load FILE    continue a saved conversation
    /help         list the commands
    /exit         quit (so does Ctrl-D)
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from ..errors import UserError
from . import options as cli

if TYPE_CHECKING:  # the engine is imported when a chat starts, so --help answers at once
    from ..engine.session import ChatSession, Reply, TurnResult

DIM, RESET = "\033[2m", "\033[0m"
PROMPT = ">> "
COMMANDS = {
    "/image PATH": "attach an image to your next message",
    "/video PATH": "attach a video to your next message",
    "/reset": "start over (the system prompt stays)",
    "/save FILE": "save the conversation and its caches",
    "/load FILE": "continue a saved conversation",
    "/help": "list the commands",
    "/exit": "quit (so does Ctrl-D)",
}


class ChatApp:
    """The read-eval-print loop around a ChatSession; `out` gets replies, `err` messages."""

    def __init__(
        self,
        session: ChatSession,
        *,
        images: list[str] | None = None,
        videos: list[str] | None = None,
        hide_thinking: bool = False,
        verbose: bool = False,
        color: bool = False,
        overrides: dict[str, Any] | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ):
        self.session = session
        self.images = list(images or [])
        self.videos = list(videos or [])
        self.hide_thinking = hide_thinking
        self.verbose = verbose
        self.color = color
        self.overrides = overrides or {}  # settings given on the command line win over /load
        self.out = out or sys.stdout
        self.err = err or sys.stderr

    def run(self, lines: Any) -> None:
        """Handle lines until /exit or the end of the input."""
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                cli.check_utf8(line, "that line")
            except UserError as e:
                self.error(str(e))
                continue
            if line.startswith("/"):
                if not self.command(line):
                    return
                continue
            try:
                self.turn(line)
            except UserError as e:
                self.error(str(e))
            except KeyboardInterrupt:
                self.write("\n")
                self.note("(stopped)")

    def command(self, line: str) -> bool:
        """Run one /command; False means quit."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        try:
            if name in ("/exit", "/quit"):
                return False
            if name == "/help":
                for usage, what in COMMANDS.items():
                    self.note(f"{usage:<13} {what}")
            elif name in ("/image", "/video"):
                self.attach(name[1:], arg)
            elif name == "/reset":
                self.session.reset()
                self.images, self.videos = [], []
                self.note("Started over.")
            elif name == "/save":
                self.save(_need(arg, "/save FILE"))
            elif name == "/load":
                self.load(_need(arg, "/load FILE"))
            else:
                self.error(f"unknown command {name}; /help lists the commands")
        except UserError as e:
            self.error(str(e))
        return True

    def save(self, path: str) -> None:
        try:
            self.session.save(path)
        except OSError as e:  # whatever the file system says, the conversation goes on
            raise UserError(_file_error("save to", path, e)) from None
        self.note(f"Saved to {path}.")

    def load(self, path: str) -> None:
        try:
            session = type(self.session).load(
                path, self.session.model, self.session.processor, **self.overrides
            )
        except OSError as e:
            raise UserError(_file_error("load", path, e)) from None
        self.session = session  # only now: a failed /load keeps the current conversation
        turns = sum(m["role"] == "user" for m in session.history)
        self.note(f"Loaded {path}: {turns} user message(s), ready to continue.")

    def attach(self, kind: str, path: str) -> None:
        """Attach a file to the next message; an image is decoded now, so a file that is not one
        is refused here instead of failing every later message."""
        path = _need(path, f"/{kind} PATH")
        full = Path(path).expanduser()
        if not full.exists():
            raise UserError(f"{path}: no such file")
        if kind == "image":
            check_image(str(full))
        (self.images if kind == "image" else self.videos).append(str(full))
        self.note(f"Attached {path} to your next message.")

    def turn(self, text: str) -> TurnResult:
        # The attachments go with this message whatever happens: one that cannot be read (a
        # video is only decoded here) must not make every later message fail too.
        images, videos = self.images, self.videos
        self.images, self.videos = [], []
        try:
            reply = self.session.send(text, images=images or None, videos=videos or None)
        except UserError as e:
            if images or videos:
                dropped = ", ".join(images + videos)
                raise UserError(f"{e} (dropped the attachments: {dropped})") from None
            raise
        with warnings.catch_warnings():
            # Malformed tool calls are reported below, once, as errors of this chat.
            from ..inputs.tools import ToolCallWarning

            warnings.simplefilter("ignore", ToolCallWarning)
            try:
                self.show(reply)
            except KeyboardInterrupt:
                reply.close()
                self.write("\n")
                self.note("(stopped)")
            result = reply.result
        for warning in result.warnings:
            self.error(f"tool call: {warning}")
        if self.verbose:
            self.note(
                f"[prompt {result.prompt_tokens} tokens: {result.reused_tokens} reused, "
                f"{result.prefilled_tokens} prefilled, {result.prompt_tps:.1f} tok/s | "
                f"{result.generation_tokens} generated, {result.generation_tps:.1f} tok/s | "
                f"peak {result.peak_memory:.2f} GB"
                + (
                    f" | drafts {result.accepted_tokens}/{result.draft_tokens} accepted]"
                    if result.draft_tokens
                    else "]"
                )
            )
        return result

    def show(self, reply: Reply) -> None:
        """Stream the reply: thinking dimmed (or between <think> tags without color) or hidden."""
        thinking = False
        for piece in reply:
            if piece.thinking and not thinking:
                thinking = True
                if not self.hide_thinking:
                    self.write(DIM if self.color else "<think>\n")
            if piece.thinking:
                if not self.hide_thinking:
                    self.write(piece.text)
                continue
            if thinking:
                thinking = False
                if not self.hide_thinking:
                    self.write((RESET if self.color else "\n</think>") + "\n\n")
            self.write(piece.text)
        if thinking and not self.hide_thinking:
            self.write(RESET if self.color else "\n</think>")
        self.write("\n")

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, text: str) -> None:
        self.err.write(f"{DIM}{text}{RESET}\n" if self.color else f"{text}\n")
        self.err.flush()

    def error(self, text: str) -> None:
        self.err.write(f"Error: {text}\n")
        self.err.flush()


def check_image(path: str) -> None:
    """Raise UserError unless `path` decodes as an image."""
    from ..inputs.images import load_image

    load_image(path)


def _file_error(action: str, path: str, e: OSError) -> str:
    """One line for an OSError of /save or /load, naming what the user typed."""
    full = Path(path).expanduser()
    parent = full.parent
    if action == "save to" and full.is_dir():
        return f"cannot save to {path}: it is a directory; give a file name"
    if not parent.exists():
        return f"cannot {action} {path}: no such directory {parent}"
    if not parent.is_dir():
        return f"cannot {action} {path}: {parent} is a file, not a directory"
    reason = e.strerror or str(e).splitlines()[0] or type(e).__name__
    return f"cannot {action} {path}: {reason}"


def _need(arg: str, usage: str) -> str:
    if not arg:
        raise UserError(f"usage: {usage}")
    return arg


def _input_lines(prompt: str) -> Any:
    """Lines from the terminal (with a prompt and line editing) until Ctrl-D or Ctrl-C."""
    while True:
        try:
            yield input(prompt)
        except (EOFError, KeyboardInterrupt):
            print()
            return


@click.command(context_settings=cli.CONTEXT_SETTINGS)
@cli.model_option
@cli.system_option
@cli.image_option("An image for the first message.")
@cli.video_option("A video for the first message.")
@cli.max_pixels_option("Pixel cap per image and video frame (default: the checkpoint's).")
@cli.fps_option("Video frames sampled per second [2].")
@cli.max_frames_option("Most frames sampled from one video.")
@cli.max_tokens_option(None, "Most tokens per reply [4096].")
@cli.sampling_options(model_card=True)
@cli.seed_option
@cli.think_option
@click.option(
    "--thinking-budget",
    type=click.IntRange(min=0),
    default=None,
    help="Close the thinking block after this many tokens and let the model answer.",
)
@click.option("--hide-thinking", is_flag=True, help="Do not print the thinking block.")
@cli.dtype_option
@cli.prefill_step_size_option("Prompt tokens per prefill step.")
@cli.kv_cache_options
@click.option(
    "--max-snapshots",
    type=click.IntRange(min=0),
    default=None,
    help="Cache snapshots kept for reuse between turns [4].",
)
@cli.speculative_options
@click.option(
    "--verbose",
    is_flag=True,
    help="Print token counts, speed, memory (and draft acceptance) per reply.",
)
def main(
    model: str,
    system: str | None,
    images: tuple[str, ...],
    videos: tuple[str, ...],
    max_pixels: int | None,
    fps: float | None,
    max_frames: int | None,
    max_tokens: int | None,
    temp: float | None,
    top_p: float | None,
    top_k: int | None,
    min_p: float | None,
    repetition_penalty: float | None,
    presence_penalty: float | None,
    seed: int | None,
    think: bool | None,
    thinking_budget: int | None,
    hide_thinking: bool,
    dtype: str | None,
    prefill_step_size: int,
    kv_bits: int | None,
    kv_group_size: int,
    quantized_kv_start: int,
    max_snapshots: int | None,
    draft_model: str | None,
    num_draft_tokens: int,
    draft_vocab: int | None,
    verbose: bool,
) -> None:
    """Chat with a Qwen3.5 model in the terminal (/help lists the commands)."""
    from ..engine.sampling import check_sampling
    from ..engine.session import DEFAULT_MAX_TOKENS, ChatSession
    from ..inputs.processor import apply_media_options, check_media_options
    from ..model.cache import check_kv_settings
    from ..weights import fit
    from ..weights.loading import load, resolve_model_path

    given = {
        "max_tokens": max_tokens,
        "temp": temp,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "repetition_penalty": repetition_penalty,
        "presence_penalty": presence_penalty,
        "enable_thinking": think,
        "thinking_budget": thinking_budget,
        "max_snapshots": max_snapshots,
        "draft_model": draft_model,
        "draft_vocab": draft_vocab,
    }
    if draft_model is not None:
        given["num_draft_tokens"] = num_draft_tokens
    overrides = {k: v for k, v in given.items() if v is not None}
    if kv_bits is not None:  # the KV settings go together (a /load without them keeps its own)
        overrides.update(
            kv_bits=kv_bits, kv_group_size=kv_group_size, quantized_kv_start=quantized_kv_start
        )
    try:
        if system is not None:
            cli.check_utf8(system, "the system prompt")
        for path in (*images, *videos):
            if not Path(path).expanduser().exists():
                raise UserError(f"{path}: no such file")
        for path in images:
            check_image(str(Path(path).expanduser()))
        # Check what needs no model before loading one (which may mean a download).
        check_sampling(
            max_tokens=1 if max_tokens is None else max_tokens,
            temp=temp or 0.0,
            top_p=1.0 if top_p is None else top_p,
            top_k=top_k or 0,
            min_p=min_p or 0.0,
            repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty,
            prefill_step_size=prefill_step_size,
            seed=seed,
        )
        check_media_options(fps=fps, max_pixels=max_pixels, max_frames=max_frames)
        cli.check_speculative(draft_model, num_draft_tokens, draft_vocab)
        check_kv_settings(kv_bits, kv_group_size, quantized_kv_start)
        model_dir = resolve_model_path(model)
        # Will it fit? Checked before any weight is read, for the least a chat needs: the system
        # prompt and one reply. A conversation grows past that turn by turn (the session says
        # when it reaches the model's context).
        context = fit.count_tokens(model_dir, [system or ""]) + (max_tokens or DEFAULT_MAX_TOKENS)
        estimate = fit.check_fit(
            model_dir,
            context,
            dtype=dtype,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
            prefill_step_size=prefill_step_size,
        )
        warning = fit.tight_warning(estimate)
        if warning:
            click.echo(warning, err=True)
        if verbose:
            click.echo(f"Will it fit? {estimate.summary()}", err=True)
        qwen, processor = load(model_dir, dtype=dtype)
        processor = apply_media_options(
            processor, fps=fps, max_pixels=max_pixels, max_frames=max_frames
        )
        session = ChatSession(
            qwen,
            processor,
            system=system,
            seed=seed,
            prefill_step_size=prefill_step_size,
            **overrides,
        )
    except UserError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    app = ChatApp(
        session,
        images=list(images),
        videos=list(videos),
        hide_thinking=hide_thinking,
        verbose=verbose,
        color=color,
        overrides=overrides,
    )
    # Lines that are not UTF-8 reach ChatApp.run as text it can refuse, instead of an exception
    # from inside the read that would end the chat.
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    interactive = sys.stdin.isatty()
    if interactive:
        app.note(f"Chatting with {model}. /help lists the commands, /exit quits.")
    app.run(_input_lines(PROMPT) if interactive else sys.stdin)


if __name__ == "__main__":
    main()

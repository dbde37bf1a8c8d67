"""A small agent loop: the model calls two local tools until it can answer.

    python examples/agent.py --question "Is it warmer in Lisbon or Oslo, by how many degrees?"
    python examples/agent.py --model tiny-random      # offline (random weights: gibberish)

The session keeps its caches between rounds: after a tool call, only the tool results are
prefilled, not the whole conversation again (the --verbose line shows the counts).
"""

from __future__ import annotations

import argparse
import ast
import operator
import sys
import warnings
from typing import Any

import mlx_qwen35
from mlx_qwen35.cli.options import DEFAULT_MODEL
from mlx_qwen35.engine.session import ChatSession
from mlx_qwen35.inputs.tools import ToolCallWarning

WEATHER = {"lisbon": (21, "sunny"), "oslo": (7, "rain"), "paris": (15, "cloudy")}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current temperature (Celsius) and sky for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate an arithmetic expression (+ - * / ** %, parentheses).",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
]


def get_weather(city: str) -> dict[str, Any]:
    found = WEATHER.get(city.strip().lower())
    if found is None:
        return {"error": f"no weather for {city}; known: {', '.join(sorted(WEATHER))}"}
    return {"city": city, "temperature_c": found[0], "sky": found[1]}


_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculate(expression: str) -> dict[str, Any]:
    """Arithmetic only: the expression is parsed, never executed."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](value(node.operand))
        raise ValueError("only numbers and + - * / ** % are allowed")

    try:
        return {"expression": expression, "result": value(ast.parse(expression, mode="eval").body)}
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as e:
        return {"error": str(e)}


FUNCTIONS = {"get_weather": get_weather, "calculate": calculate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="checkpoint, repo id or tiny-random")
    parser.add_argument(
        "--question", default="Is it warmer in Lisbon or Oslo right now, and by how many degrees?"
    )
    parser.add_argument("--max-rounds", type=int, default=5, help="most tool-call rounds")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--thinking-budget", type=int, default=512)
    parser.add_argument("--verbose", action="store_true", help="print token counts per round")
    args = parser.parse_args()
    # report() prints each malformed call from result.warnings; Python need not print it again.
    warnings.simplefilter("ignore", ToolCallWarning)

    try:
        model, processor = mlx_qwen35.load(args.model)
        chat = ChatSession(
            model,
            processor,
            system="Use the tools for facts and arithmetic. Answer in one sentence.",
            tools=TOOLS,
            max_tokens=args.max_tokens,
            thinking_budget=args.thinking_budget,
        )
        result = chat.ask(args.question)
        for _ in range(args.max_rounds):
            report(result, args.verbose)
            if not result.tool_calls:
                break
            outputs = []
            for call in result.tool_calls:
                output = FUNCTIONS[call.name](**call.arguments)
                print(f"-> {call.name}({call.arguments}) = {output}")
                outputs.append(call.result(output))
            result = chat.ask(tool_results=outputs)
        else:
            report(result, args.verbose)
        print(f"\nAnswer: {result.text}")
    except mlx_qwen35.UserError as e:
        sys.exit(f"Error: {e}")


def report(result: Any, verbose: bool) -> None:
    for warning in result.warnings:
        print(f"(warning: {warning})")
    if verbose:
        print(
            f"(prompt {result.prompt_tokens} tokens, {result.reused_tokens} from the cache, "
            f"{result.prefilled_tokens} prefilled; {result.generation_tokens} generated)"
        )


if __name__ == "__main__":
    main()

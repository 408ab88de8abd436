"""The smallest workflow: one durable step."""

from __future__ import annotations

from natflow import Client, RunHandle, WorkflowContext, workflow


def say_hello(name: str) -> str:
    return f"Hello, {name}!"


@workflow
async def greet(ctx: WorkflowContext, input: dict[str, str]) -> dict[str, str]:
    text = await ctx.step("hello", say_hello, input["name"])
    return {"greeting": text}


async def demo(client: Client) -> list[RunHandle]:
    """Start this example's runs (used by `make demo` and the example tests)."""
    return [await client.start(greet, {"name": "Ada"}, run_id="demo-greet-ada")]

"""Flow control: a per-customer concurrency limit, a shared step rate limit, a debounce.

``sync_account`` runs one sync per customer at a time (``Limit(max=1, key="customer")``),
across every worker; its ``push`` steps share one budget of calls to a CRM
(``RateLimit("crm", ...)``), whichever run or worker makes them. ``reindex`` is debounced:
starts for one document within half a second collapse into one run that gets the last
start's input (its first step, ``natflow-debounce``, takes it). README "Flow control".
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from natflow import Client, Debounce, Limit, RateLimit, RunHandle, WorkflowContext, workflow

# 20 calls a second to the CRM, shared by every step and worker that names "crm".
crm = RateLimit("crm", limit=20, period=1.0)


def push(customer: str, record: int) -> str:
    now = datetime.now(UTC).strftime("%H:%M:%S.%f")[:-3]
    return f"{customer}/{record} pushed at {now}"


@workflow(concurrency=Limit(max=1, key="customer"))
async def sync_account(ctx: WorkflowContext, input: dict[str, Any]) -> dict[str, Any]:
    customer = str(input["customer"])
    pushed = [
        await ctx.step("push", push, customer, record, rate_limit=crm)
        for record in range(int(input["records"]))
    ]
    # The pushes of all runs together are spaced 1/20 s apart (see the times the demo
    # prints), and a customer's second sync starts only once its first has finished.
    return {"customer": customer, "pushed": len(pushed)}


def build_index(doc: str, text: str) -> str:
    return f"indexed {doc!r}: {len(text.split())} words"


@workflow(debounce=Debounce(0.5, key="doc"))
async def reindex(ctx: WorkflowContext, input: dict[str, str]) -> str:
    return await ctx.step("index", build_index, input["doc"], input["text"])


async def demo(client: Client) -> list[RunHandle]:
    """Start this example's runs (used by `make demo` and the example tests)."""
    handles = [
        await client.start(
            sync_account, {"customer": customer, "records": 3}, run_id=f"demo-sync-{customer}-{n}"
        )
        for customer, n in (("acme", 1), ("acme", 2), ("bolt", 1))
    ]
    # Five saves of one document in quick succession: one run, with the last text.
    edits = ["draft", "draft two", "draft two three", "final text of the", "final text of the doc"]
    saves = [await client.start(reindex, {"doc": "readme", "text": text}) for text in edits]
    assert len({save.run_id for save in saves}) == 1  # every save joined the one run
    return [*handles, saves[-1]]

"""An agent loop over farmesh-ws: ask, follow up on the answer, account for every token.

Start a gateway (``farmesh-ws serve``), then run::

    python docs/agent_example.py [ws://127.0.0.1:8100/ws]

With ``FARMESH_API_KEY`` set (``farmesh-ws keys create``), the key's wallet pays; without one,
a loopback gateway serves it anonymously under its free quota.
"""
# ruff: noqa: T201  (an example script: printing is its output)

import asyncio
import os
import sys

from farmesh_ws.client import FarmeshClient, FarmeshClientError, Reply


async def main(url: str) -> int:
    token = os.environ.get("FARMESH_API_KEY")  # who pays: a credential, never a claim
    async with FarmeshClient.connect(url, timeout=60, token=token) as client:
        chat = await client.open_chat(
            max_cost_far="0.05",  # the whole session may not cost more than this
        )
        print(f"session {chat.session_id} on {chat.model}")

        question = "What is the capital of France?"
        first = await chat.ask(question, max_new_tokens=48, temperature=0)
        report(question, first)

        # The next step depends on the answer. It sends only its own tokens: the mesh
        # still holds the history, which is not billed again.
        words = first.text.strip().rstrip(".").split()
        city = words[-1] if words else "Paris"
        follow_up = f"Name one famous landmark in {city}."
        try:
            second = await chat.ask(follow_up, max_new_tokens=48, temperature=0)
        except FarmeshClientError as exc:  # e.g. budget_exceeded, mesh_unavailable (retryable)
            print(f"follow-up failed: {exc.code} ({'retryable' if exc.retryable else 'final'})")
            return 1
        report(follow_up, second)

        print(f"total: {chat.total_cost_far:f} $FAR, {chat.room} of {chat.max_length} tokens left")
        for node in second.contribution.nodes:
            print(
                f"  {node.name or node.peer_id[:12]} blocks {node.start_block}-{node.end_block}:"
                f" {node.share_far:f} $FAR"
            )
    return 0


def report(question: str, reply: Reply) -> None:
    usage = reply.usage
    print(f"> {question}\n{reply.text.strip()}")
    print(
        f"  [{usage.completion_tokens} tokens, prompt {usage.prompt_tokens}"
        f" (+{usage.cached_tokens} cached), {reply.done.finish_reason}, {usage.cost_far:f} $FAR]"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8100/ws")))

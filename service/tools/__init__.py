"""Not the server: the ``fanout submit`` client and board, and ``fanout fake-llm``, the
OpenAI-compatible simulator. Nothing in the server imports them."""

"""The official Anthropic Python SDK reading Sluice's errors: each model is
asked for a message while the provider fails, and the SDK's own error class,
status, error type and message are printed."""

import os

import anthropic

client = anthropic.Anthropic(
    base_url=os.environ["ANTHROPIC_BASE_URL"], api_key=os.environ["ANTHROPIC_API_KEY"], max_retries=0
)

for model in os.environ["SLUICE_MODELS"].split(","):
    try:
        client.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "fail please"}])
        print(f"{model} answered")
    except anthropic.APIStatusError as e:
        error = e.body["error"]
        print(f"{model} error: {type(e).__name__} {e.status_code} {error['type']} {error['message']}")

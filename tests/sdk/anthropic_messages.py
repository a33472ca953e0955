"""The official Anthropic Python SDK against Sluice's /v1/messages, unchanged:
base_url + api key. Each model is asked for a message and a stream; one
model's deployment speaks Anthropic's API, the other OpenAI's (translated)."""

import os

import anthropic

client = anthropic.Anthropic(
    base_url=os.environ["ANTHROPIC_BASE_URL"], api_key=os.environ["ANTHROPIC_API_KEY"], max_retries=0
)

for model in os.environ["SLUICE_MODELS"].split(","):
    message = client.messages.create(
        model=model,
        max_tokens=64,
        system="answer briefly",
        messages=[{"role": "user", "content": f"hello {model} from the anthropic sdk"}],
    )
    print(f"{model} message:", message.content[0].text, message.stop_reason)
    print(f"{model} usage:", message.usage.input_tokens > 0, message.usage.output_tokens > 0)

    with client.messages.stream(
        model=model,
        max_tokens=64,
        messages=[{"role": "user", "content": f"stream {model} please"}],
    ) as stream:
        pieces = [text for text in stream.text_stream]
        final = stream.get_final_message()
    print(f"{model} stream:", "".join(pieces), len(pieces) > 1, final.stop_reason, final.usage.output_tokens > 0)

try:
    client.messages.create(model="no-such-model", max_tokens=8, messages=[{"role": "user", "content": "x"}])
except anthropic.NotFoundError as e:
    print("error:", e.status_code, e.body["error"]["type"])

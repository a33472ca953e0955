"""The official OpenAI Python SDK against Sluice, unchanged: base_url + api key."""

import os

import openai

client = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"], max_retries=0)
model = os.environ["SLUICE_MODEL"]

completion = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "hello from the openai sdk"}],
)
print("content:", completion.choices[0].message.content)
print("usage:", completion.usage.prompt_tokens, completion.usage.completion_tokens)

print("models:", sorted(m.id for m in client.models.list()))

stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "stream this please"}],
    stream=True,
)
print("stream:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))

embeddings = client.embeddings.create(model=model, input=["one", "two"])
print("embeddings:", len(embeddings.data), len(embeddings.data[0].embedding) > 0)

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    print("error: none")
except openai.NotFoundError as e:
    print("error:", e.status_code, e.code)

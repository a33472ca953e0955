"""Embeddings of real sizes through the official OpenAI Python SDK: 100 inputs
(about 2 MB of answer) and 2,048 inputs (OpenAI's per-request maximum, about
43 MB), both at 1,536 dimensions, and the raw size of each answer."""

import os

import openai

client = openai.OpenAI(
    base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"], max_retries=0, timeout=120
)
model = os.environ["SLUICE_MODEL"]

for n in (100, 2048):
    inputs = [f"document {i} of a retrieval batch" for i in range(n)]
    raw = client.embeddings.with_raw_response.create(model=model, input=inputs, dimensions=1536, encoding_format="float")
    answer = raw.parse()
    dims = {len(d.embedding) for d in answer.data}
    indexes = [d.index for d in answer.data] == list(range(n))
    print(f"embeddings {n}: {raw.http_response.status_code} {len(answer.data)} {sorted(dims)} {indexes} bytes={len(raw.http_response.content)}")

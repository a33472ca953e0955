"""Slow non-streamed answers through the official OpenAI Python SDK with its
defaults (a 10-minute timeout, two retries): one request per model named in
SLUICE_MODELS, all at once; prints each one's status, completion tokens, job
id and seconds taken."""

import os
import time
from concurrent.futures import ThreadPoolExecutor

import openai

client = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key=os.environ["OPENAI_API_KEY"])


def ask(model):
    began = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": f"take your time, {model}"}]
    )
    completion = raw.parse()
    took = time.monotonic() - began
    job = raw.headers.get("x-sluice-job-id")
    return f"{model}: {raw.status_code} completion_tokens={completion.usage.completion_tokens} job={job} seconds={took:.1f}"


models = os.environ["SLUICE_MODELS"].split(",")
with ThreadPoolExecutor(len(models)) as pool:
    for line in pool.map(ask, models):
        print(line, flush=True)

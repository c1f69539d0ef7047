"""A fallback seen from the SDK: the raw response's headers say which model served."""
import json

import openai

client = openai.OpenAI()
raw = client.chat.completions.with_raw_response.create(
    model="gpt-4o",
    messages=[{"role": "user", "content": "hi"}],
)
completion = raw.parse()
print(json.dumps({
    "status": raw.status_code,
    "x-backstop-model": raw.headers.get("x-backstop-model"),
    "x-backstop-fallback": raw.headers.get("x-backstop-fallback"),
    "x-backstop-attempts": raw.headers.get("x-backstop-attempts"),
    "model": completion.model,
}))

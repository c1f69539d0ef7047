"""A normal completion through the proxy with the official openai SDK.

Reads OPENAI_BASE_URL and OPENAI_API_KEY from the environment (the SDK's own
variables) and prints one JSON line for the Rust test to check.
"""
import json

import openai

client = openai.OpenAI()
completion = client.chat.completions.create(
    model="gpt-4o",
    messages=[{"role": "user", "content": "hi"}],
)
print(json.dumps({
    "model": completion.model,
    "content": completion.choices[0].message.content,
    "finish_reason": completion.choices[0].finish_reason,
}))

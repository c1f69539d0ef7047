"""A final failure: the SDK, left at its default max_retries=2, must make exactly
one request because the proxy answers `x-should-retry: false`."""
import json

import openai

client = openai.OpenAI()
assert client.max_retries == 2, client.max_retries
try:
    client.chat.completions.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "hi"}],
    )
    print(json.dumps({"raised": None}))
except openai.APIStatusError as error:
    print(json.dumps({
        "raised": type(error).__name__,
        "status": error.status_code,
        "x-should-retry": error.response.headers.get("x-should-retry"),
        "x-backstop-attempts": error.response.headers.get("x-backstop-attempts"),
    }))

"""A streamed completion through the proxy: the SDK's SSE reader must see every
chunk and the end of the stream."""
import json

import openai

client = openai.OpenAI()
stream = client.chat.completions.create(
    model="gpt-4o",
    messages=[{"role": "user", "content": "hi"}],
    stream=True,
)
chunks = 0
content = ""
finish_reason = None
for chunk in stream:
    chunks += 1
    delta = chunk.choices[0].delta.content
    if delta:
        content += delta
    if chunk.choices[0].finish_reason:
        finish_reason = chunk.choices[0].finish_reason
print(json.dumps({"chunks": chunks, "content": content, "finish_reason": finish_reason}))

"""Reading a PNG's `parameters` chunk back into fields (AUTOMATIC1111's png-info)."""
from __future__ import annotations

import json
import re

# `Key: value` pairs of the last line; a value is a JSON string (quoted when it holds , : or ") or runs to the comma.
_FIELD = re.compile(r'\s*([^,:"]+?):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """{"Prompt", "Negative prompt", and each `Key: value` of the last line}. A last line that has no fields is
    part of the prompt."""
    lines = text.strip("\n").split("\n")
    fields: dict[str, str] = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 1 and ":" in lines[-1]:
        for key, value in _FIELD.findall(lines.pop()):
            if value.startswith('"'):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            fields[key.strip()] = value.strip() if isinstance(value, str) else value
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt:") or negative:
            negative.append(line.removeprefix("Negative prompt:").strip() if not negative else line)
        else:
            prompt.append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **fields}

"""Small file helpers shared by the CLIs: JSON reading with one-line errors, atomic writes."""
import json
import os

from gptsan.errors import GPTSANError


def read_json(path, what="file"):
    """Loads a JSON file; a missing or malformed file is a one-line GPTSANError naming `what`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise GPTSANError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GPTSANError(f"{what} {path} is not valid JSON: {err}") from None


def write_text_atomic(path, text):
    """Writes `text` via a temp file + rename: never leaves a partial file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

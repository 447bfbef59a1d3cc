"""Small file helpers shared by the CLIs: JSON reading with one-line errors, atomic writes.

Paths with a scheme (`gs://bucket/...` for TPU runs, `ram://` in tests) go through
`tf.io.gfile` (TensorFlow is imported only then); plain paths use the standard library.
"""
import json
import os
import shutil

from gptsan.errors import GPTSANError


def is_url(path):
    """True for paths with a scheme, e.g. gs://bucket/models/gptsan."""
    return "://" in str(path)


def _gfile():
    from gptsan.compat import tf

    return tf.io.gfile


def absolute(path):
    """os.path.abspath for local paths; URLs unchanged."""
    return str(path) if is_url(path) else os.path.abspath(path)


def join(folder, *names):
    return "/".join([str(folder).rstrip("/"), *names]) if is_url(folder) else \
        os.path.join(folder, *names)


def dirname(path):
    """The folder holding `path` (absolute for local paths)."""
    return str(path).rstrip("/").rsplit("/", 1)[0] if is_url(path) else \
        os.path.dirname(os.path.abspath(path))


def isdir(path):
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


def exists(path):
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isfile(path):
    return exists(path) and not isdir(path)


def listdir(path):
    return _gfile().listdir(path) if is_url(path) else os.listdir(path)


def makedirs(path):
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path):
    """The UTF-8 text of a file (FileNotFoundError when it is missing)."""
    if is_url(path):
        if not _gfile().exists(path):
            raise FileNotFoundError(path)
        with _gfile().GFile(path, "rb") as f:
            return f.read().decode("utf-8")
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_json(path, what="file"):
    """Loads a JSON file; a missing or malformed file is a one-line GPTSANError naming `what`."""
    try:
        return json.loads(read_text(path))
    except FileNotFoundError:
        raise GPTSANError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GPTSANError(f"{what} {path} is not valid JSON: {err}") from None


def write_text_atomic(path, text):
    """Writes `text` via a temp file + rename: never leaves a partial file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    if is_url(path):
        with _gfile().GFile(tmp, "wb") as f:
            f.write(text.encode("utf-8"))
        _gfile().rename(tmp, path, overwrite=True)
        return
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def copy_file_atomic(source, target):
    """Copies `source` to `target` via a temp file + rename (either may be a URL)."""
    tmp = f"{target}.tmp-{os.getpid()}"
    if is_url(source) or is_url(target):
        _gfile().copy(source, tmp, overwrite=True)
        _gfile().rename(tmp, target, overwrite=True)
    else:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)

"""Small file helpers shared by the CLIs: JSON reading with one-line errors, output checks,
atomic writes.

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


def _url(path, action):
    """action(tf.io.gfile) for the URL `path`; an unreachable bucket, missing credentials or
    a denied access becomes a one-line GPTSANError instead of a traceback."""
    from gptsan.compat import tf

    try:
        return action(tf.io.gfile)
    except tf.errors.OpError as err:
        raise GPTSANError(f"cannot access {path}: {err.message.splitlines()[0]}") from None


def _read_bytes(gfile, path):
    with gfile.GFile(path, "rb") as f:
        return f.read()


def _write_bytes(gfile, path, data):
    with gfile.GFile(path, "wb") as f:
        f.write(data)


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
    return _url(path, lambda g: g.isdir(path)) if is_url(path) else os.path.isdir(path)


def exists(path):
    return _url(path, lambda g: g.exists(path)) if is_url(path) else os.path.exists(path)


def isfile(path):
    return exists(path) and not isdir(path)


def listdir(path):
    return _url(path, lambda g: g.listdir(path)) if is_url(path) else os.listdir(path)


def glob(pattern):
    """Paths matching `pattern` (tf.io.gfile.glob: local or gs:// patterns)."""
    return _url(pattern, lambda g: g.glob(pattern))


def makedirs(path):
    if is_url(path):
        _url(path, lambda g: g.makedirs(path))
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path):
    """The UTF-8 text of a file (FileNotFoundError when it is missing)."""
    if is_url(path):
        if not exists(path):
            raise FileNotFoundError(path)
        return _url(path, lambda g: _read_bytes(g, path)).decode("utf-8")
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
        _url(path, lambda g: (_write_bytes(g, tmp, text.encode("utf-8")),
                              g.rename(tmp, path, overwrite=True)))
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
        _url(target, lambda g: (g.copy(source, tmp, overwrite=True),
                                g.rename(tmp, target, overwrite=True)))
    else:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


def check_output_path(path, force):
    """Refuses to overwrite an existing output file unless `force` (checked before any work)."""
    if path and os.path.exists(path) and not force:
        raise GPTSANError(f"output file {path} exists (use --force to overwrite it)")
    if path and os.path.isdir(path):
        raise GPTSANError(f"output {path} is a directory")
    parent = os.path.dirname(os.path.abspath(path)) if path else None
    if parent and not os.path.isdir(parent):
        raise GPTSANError(f"output directory {parent} does not exist")


def write_json_atomic(path, data, indent=None, ascii_only=False):
    """Writes JSON via a temp file + rename: never leaves a partial file.

    ascii_only: escape non-ASCII characters (json.dumps' default, as the published scripts
    write their outputs); otherwise UTF-8 text.
    """
    text = json.dumps(data, ensure_ascii=ascii_only, indent=indent)
    write_text_atomic(path, text + "\n")


def save_npy_atomic(path, array):
    """np.save via a temp file + rename: never leaves a partial file."""
    import numpy as np

    tmp = f"{path}.tmp-{os.getpid()}.npy"
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

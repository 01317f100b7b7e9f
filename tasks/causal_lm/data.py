"""Plain-text corpora (PTB, WikiText-2/103, any text file) -> Megatron .bin/.idx for causal-LM
finetuning.

    python tasks/causal_lm/data.py --input ptb.train.txt --format ptb --data-dir data/ptb \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \\
        --merge-file gpt2-merges.txt --workers 8

What a row is (``--format``), as the Hugging Face datasets the random-LTD paper finetuned on:

- ``ptb``: one sentence per line with the surrounding whitespace stripped and no newline kept,
  as ``ptb_text_only`` (``penn_treebank``) rows (``ptb.{train,valid,test}.txt``);
- ``wikitext``: the raw WikiText-2/103 lines (``wiki.{train,valid,test}.raw``) with their
  newline, a whitespace-only line becoming the empty row, as ``wikitext-*-raw-v1`` rows;
- ``lines``: any UTF-8 text, every line as it is (newline included), so the rows joined give
  the file back.

Every row is tokenized on its own and the rows' token streams are concatenated in file order
without an EOD between them: exactly what Hugging Face's ``run_clm.py`` (the script behind the
paper's GPT-2 finetuning) does with these datasets' rows -- it tokenizes each row and
concatenates the results before cutting them into blocks. The whole file is stored as ONE
sequence of ONE document, so Megatron's GPTDataset cuts it into consecutive samples of
``seq_length + 1`` tokens in file order (and shuffles the samples, not the rows), as run_clm
cuts its concatenation into blocks; a dataset of one document per row would shuffle the rows
(WikiText paragraphs) before concatenating them.

Tokenization runs through ``tools/preprocess_data.py`` (``--workers`` processes, progress on
stderr; WikiText-103's 500 MB train file needs them) on a temporary jsonl of the non-empty rows;
its per-row sequences are then re-indexed as the single sequence (the .bin is the token stream
already, nothing is copied). The result is cached in ``--data-dir`` under a name keyed by the
source file (absolute path, size, mtime), the format and the tokenizer (type and the files'
contents): a rerun with the same inputs reuses it. ``<name>.json`` is written last and marks a
complete entry (under torchrun the other ranks wait for it).
"""

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == "__main__" and ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from megatron.errors import UserError, run_main  # noqa: E402

FORMATS = ("ptb", "wikitext", "lines")
CACHE_VERSION = 1  # part of the cache key: bump when the produced tokens change
CHECK_LINES = 2000  # lines read to check that a file fits its --format
_LINE = re.compile(r"[^\n]*\n|[^\n]+")
_WIKITEXT_HEADING = re.compile(r"^ (= )+[^=].* (= )*=\s*$")


@dataclass(frozen=True)
class PreparedText:
    """A tokenized text file: the dataset prefix (``<prefix>.bin/.idx``) and what it holds."""

    prefix: str
    """--data-path/--train-data-path value (``..._text_document``)."""
    tokens: int
    """Tokens in the stream (the whole file)."""
    rows: int
    """Rows of the file (its lines), empty ones included."""
    words: int
    """Whitespace-separated words of the rows (for word-level perplexity)."""
    cached: bool
    """True when an earlier run's result was reused."""
    meta: dict
    """The marker's content (source, tokenizer, counts)."""


# ---------------------------------------------------------------------------------------------
# rows


def row_text(line, fmt):
    """The dataset row a line of the file stands for (see the module docstring)."""
    if fmt == "ptb":
        return line.strip()
    if fmt == "wikitext":
        return line if line.strip() else ""
    return line


def _check_file(path, flag):
    if not os.path.exists(path):
        raise UserError(f"{flag} {path}: no such file")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: not a regular file")


def iter_lines(path, flag="--input"):
    """(line number, line) of a UTF-8 text file with universal newlines (as the Hugging Face
    loaders read these files: '\\r\\n' and '\\r' end lines too). A line that is not UTF-8 or
    holds NUL bytes is a UserError naming the file and line."""
    _check_file(path, flag)
    number = 0
    with open(path, "rb") as f:
        for raw in f:
            number += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(f"{flag} {path}:{number}: not UTF-8 text ({err.reason} at byte "
                                f"{err.start} of the line); is it a text file?") from None
            if "\x00" in text:
                raise UserError(f"{flag} {path}:{number}: contains NUL bytes; expected a plain "
                                f"text file")
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                for part in _LINE.findall(text):
                    yield number, part
            else:
                yield number, text


def iter_rows(path, fmt, flag="--input"):
    """The file's rows, one per line (empty rows included), in order (see ``row_text``)."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    for _, line in iter_lines(path, flag):
        yield row_text(line, fmt)


def check_format(path, fmt, flag="--input"):
    """A one-line UserError when the first lines of ``path`` do not fit ``--format fmt``, or the
    file has no text. ``ptb``: PTB's text-only files are lowercased with numbers written N (a
    WikiText heading or an uppercase word means another corpus); ``wikitext``: the raw files
    have ' = Title = ' heading lines; ``lines``: any text."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    seen = heading = 0
    upper = None
    for number, line in iter_lines(path, flag):
        if number > CHECK_LINES:
            break
        if not line.strip():
            continue
        seen += 1
        if _WIKITEXT_HEADING.match(line):
            heading = heading or number
        if upper is None:
            word = next((w for w in line.split() if w != "N" and w != "<unk>"
                         and any(c.isupper() for c in w)), None)
            if word is not None:
                upper = (number, word)
    if seen == 0 and not _has_text(path, flag):
        raise UserError(f"{flag} {path}: no text (the file is empty or has only blank lines)")
    if fmt == "ptb":
        if heading:
            raise UserError(f"{flag} {path}:{heading}: a WikiText heading line (' = Title = '); "
                            f"--format ptb expects Penn Treebank text (use --format wikitext)")
        if upper is not None:
            raise UserError(f"{flag} {path}:{upper[0]}: uppercase word {upper[1]!r}; --format "
                            f"ptb expects the lowercased Penn Treebank text files "
                            f"(ptb.*.txt; use --format lines for other text)")
    elif fmt == "wikitext" and not heading:
        raise UserError(f"{flag} {path}: no ' = Title = ' heading line in its first "
                        f"{CHECK_LINES} lines; --format wikitext expects the raw WikiText "
                        f"files (wiki.*.raw; use --format lines for other text)")


def _has_text(path, flag):
    return any(line.strip() for _, line in iter_lines(path, flag))


# ---------------------------------------------------------------------------------------------
# cache


def _file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_identity(tokenizer):
    """{type, files: {flag: sha256}} of a tokenizer spec (``tokenizer_type``, ``vocab_file``,
    ``merge_file``, ``tokenizer_model``, ``vocab_size``); a named file that is missing is a
    UserError naming the flag."""
    if not tokenizer.get("tokenizer_type"):
        raise UserError("--tokenizer-type is required to tokenize the text")
    files = {}
    for key in ("vocab_file", "merge_file", "tokenizer_model"):
        path = tokenizer.get(key)
        if path is None:
            continue
        if not os.path.isfile(path):
            raise UserError(f"--{key.replace('_', '-')} {path}: no such file")
        files[key] = _file_digest(path)
    return {"tokenizer_type": tokenizer["tokenizer_type"], "files": files,
            "vocab_size": tokenizer.get("vocab_size")}


def cache_entry(path, fmt, tokenizer, data_dir):
    """(prefix of the dataset files, marker path, key dict) of ``path`` in ``data_dir``."""
    st = os.stat(path)
    key = {"version": CACHE_VERSION, "source": os.path.abspath(path), "size": st.st_size,
           "mtime_ns": st.st_mtime_ns, "format": fmt, "tokenizer": tokenizer_identity(tokenizer)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path)) or "text"
    name = os.path.join(os.path.abspath(data_dir), f"{stem}-{fmt}-{digest}")
    return name + "_text_document", name + ".json", key


def read_json(path):
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def write_json(path, obj):
    """Write ``obj`` to ``path`` through a temporary file renamed when complete."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _cached(prefix, marker, key):
    meta = read_json(marker)
    if meta is None or meta.get("key") != key:
        return None
    if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
        return None
    return PreparedText(prefix, meta["tokens"], meta["rows"], meta["words"], True, meta)


# ---------------------------------------------------------------------------------------------
# building


def write_rows_jsonl(path, fmt, out, flag="--input", log=print):
    """Write the non-empty rows of ``path`` as ``{"text": row}`` lines to ``out``; returns
    (rows, non-empty rows, words)."""
    rows = kept = words = 0
    total = max(os.path.getsize(path), 1)
    next_report, start = 0.1, time.time()
    done = 0
    with open(out, "w", encoding="utf-8") as f:
        for text in iter_rows(path, fmt, flag):
            rows += 1
            done += len(text) + 1
            if text:
                kept += 1
                words += len(text.split())
                f.write(json.dumps({"text": text}, ensure_ascii=False))
                f.write("\n")
            if done / total >= next_report and total > (16 << 20):
                log(f" > {os.path.basename(path)}: read {100 * min(done / total, 1):.0f}% "
                    f"({rows} lines, {time.time() - start:.0f} s)")
                next_report += 0.1
    return rows, kept, words


def _run_preprocess(jsonl, prefix_base, tokenizer, workers, log):
    """tools/preprocess_data.py on ``jsonl`` (no EOD); its progress goes to our stderr."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"),
           "--input", jsonl, "--output-prefix", prefix_base,
           "--tokenizer-type", tokenizer["tokenizer_type"], "--workers", str(workers),
           "--log-interval", "20000"]
    for key in ("vocab_file", "merge_file", "tokenizer_model", "vocab_size"):
        if tokenizer.get(key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(tokenizer[key])]
    log(f" > tokenizing with {workers} worker(s): tools/preprocess_data.py")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    tail = []

    def pump(stream, sink):
        for line in stream:
            sink.write(line)
            sink.flush()
            tail.append(line.rstrip("\n"))
            del tail[:-20]

    threads = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, sys.stderr), daemon=True)]
    for t in threads:
        t.start()
    try:
        code = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    for t in threads:
        t.join()
    if code != 0:
        error = next((line for line in reversed(tail) if line.startswith("error:")), None)
        raise UserError(f"tools/preprocess_data.py failed (exit {code}): "
                        f"{error[len('error:'):].strip() if error else (tail or ['?'])[-1]}")


def make_single_sequence(prefix):
    """Rewrite ``prefix.idx`` so that the whole .bin is one sequence of one document (the
    token stream in file order); the .bin is untouched. Returns the token count."""
    import numpy as np

    from megatron.data.indexed_dataset import _HEADER, MAGIC, VERSION, IndexedDataset, dtype_code

    ds = IndexedDataset(prefix)
    total, dtype = int(np.sum(ds.sizes, dtype=np.int64)), ds.dtype
    del ds
    if total >= 2 ** 31:
        raise UserError(f"{prefix}.bin: {total} tokens do not fit one int32 sequence size; "
                        f"split the text file")
    idx = prefix + ".idx"
    tmp = f"{idx}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(_HEADER.pack(MAGIC, VERSION, dtype_code(dtype), 1, 2))
        f.write(np.asarray([total], dtype="<i4").tobytes())
        f.write(np.asarray([0], dtype="<i8").tobytes())
        f.write(np.asarray([0, 1], dtype="<i8").tobytes())
    os.replace(tmp, idx)
    return total


def prepare_text(path, fmt, data_dir, tokenizer, *, workers=1, flag="--input", log=print):
    """Tokenize ``path`` (rows per ``fmt``) into ``data_dir`` unless a matching cache entry is
    there; returns a ``PreparedText``. ``tokenizer``: dict of tokenizer_type, vocab_file,
    merge_file, tokenizer_model, vocab_size."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    check_format(path, fmt, flag)
    os.makedirs(data_dir, exist_ok=True)
    prefix, marker, key = cache_entry(path, fmt, tokenizer, data_dir)
    hit = _cached(prefix, marker, key)
    if hit is not None:
        log(f" > {flag} {path}: cached ({hit.tokens} tokens) at {prefix}")
        return hit
    start = time.time()
    base = prefix[:-len("_text_document")]
    jsonl = f"{base}.rows.jsonl.tmp.{os.getpid()}"
    try:
        log(f" > {flag} {path}: --format {fmt}, one row per line, rows tokenized separately "
            f"and concatenated without EOD")
        rows, kept, words = write_rows_jsonl(path, fmt, jsonl, flag, log)
        if kept == 0:
            raise UserError(f"{flag} {path}: no text (every row is empty)")
        _run_preprocess(jsonl, base, tokenizer, workers, log)
    finally:
        if os.path.exists(jsonl):
            os.remove(jsonl)
    tokens = make_single_sequence(prefix)
    if tokens < 2:
        raise UserError(f"{flag} {path}: only {tokens} token(s); too little text to train or "
                        f"evaluate on")
    meta = {"key": key, "prefix": prefix, "tokens": tokens, "rows": rows, "nonempty_rows": kept,
            "words": words, "seconds": round(time.time() - start, 3)}
    write_json(marker, meta)  # last: marks a complete entry
    log(f" > {flag} {path}: {rows} rows, {tokens} tokens -> {prefix} "
        f"({time.time() - start:.1f} s)")
    return PreparedText(prefix, tokens, rows, words, False, meta)


# ---------------------------------------------------------------------------------------------
# several processes (torchrun / SLURM): rank 0 prepares, the others wait


def global_rank():
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def launch_id():
    """Identifies this launch across its ranks (a failure marker of another launch is stale)."""
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"


def prepare_on_rank0(path, fmt, data_dir, tokenizer, *, workers=1, flag="--input",
                     timeout=7200.0, poll=1.0, rank=None, log=print):
    """``prepare_text`` on global rank 0; every other rank waits (at most ``timeout`` seconds)
    for rank 0's completion marker and then reads the same entry. A failure on rank 0 is left
    as ``<entry>.failed`` for this launch, so the others stop with its message instead of
    waiting out the timeout."""
    rank = global_rank() if rank is None else rank
    check_format(path, fmt, flag)  # every rank: a bad file is the same one-line error anywhere
    prefix, marker, key = cache_entry(path, fmt, tokenizer, data_dir)
    failed = marker[:-len(".json")] + ".failed"
    if rank == 0:
        os.makedirs(data_dir, exist_ok=True)
        if os.path.exists(failed):
            os.remove(failed)
        try:
            return prepare_text(path, fmt, data_dir, tokenizer, workers=workers, flag=flag,
                                log=log)
        except BaseException as err:
            message = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            try:
                write_json(failed, {"launch": launch_id(), "error": message})
            except OSError:
                pass
            raise
    deadline = time.time() + timeout
    while True:
        hit = _cached(prefix, marker, key)
        if hit is not None:
            return hit
        info = read_json(failed)
        if info is not None and info.get("launch") == launch_id():
            raise UserError(f"rank 0 failed to prepare {flag} {path}: {info.get('error')}")
        if time.time() > deadline:
            raise UserError(f"{flag} {path}: rank {rank} waited {timeout:.0f} s for rank 0 to "
                            f"tokenize it into {data_dir} (no {os.path.basename(marker)}); "
                            f"is --data-dir on a file system every node shares? (raise "
                            f"--prep-timeout for a slow file system)")
        time.sleep(poll)


# ---------------------------------------------------------------------------------------------
# CLI


def tokenizer_from_flags(args):
    return {k: getattr(args, k) for k in ("tokenizer_type", "vocab_file", "merge_file",
                                          "tokenizer_model", "vocab_size")}


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="the text file")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="ptb (ptb_text_only rows), wikitext (raw WikiText rows) or lines")
    p.add_argument("--data-dir", required=True, help="cache directory of the tokenized files")
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-model", default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes of tools/preprocess_data.py")
    args = p.parse_args(argv)
    out = prepare_text(args.input, args.format, args.data_dir, tokenizer_from_flags(args),
                       workers=args.workers)
    print(json.dumps({"prefix": out.prefix, "tokens": out.tokens, "rows": out.rows,
                      "words": out.words, "cached": out.cached}))
    return out


if __name__ == "__main__":
    run_main(main)
